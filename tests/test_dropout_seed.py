"""The shared dropout-seed pool (fastvl.ops.dropout_seed): one launch draws a forward's seeds, the ops
take views; determinism, no state carried across forwards (exact resume), activation checkpointing
replays the same seeds, torch.compile and CUDA graph capture draw per call, and direct op calls keep
their per-call draws."""

import pytest
import torch
from test_vilbert import SMALL, _batch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvl
from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining
from fastvl.nn.common import set_gradient_checkpointing
from fastvl.ops import dropout_seed
from fastvl.ops.attention_launch import draw_seed

CPU = torch.device("cpu")
TRITON = dict(attention="triton", co_attention="triton", layer_norm="triton", bias_gelu="triton")


class RandintCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "randint"
        return func(*args, **(kwargs or {}))


def test_a_scope_hands_out_views_of_one_draw():
    torch.manual_seed(3)
    with RandintCounter() as counter, dropout_seed.shared_seeds():
        seeds = [dropout_seed.next_seed(CPU) for _ in range(dropout_seed.SEEDS_PER_DRAW + 5)]
        assert dropout_seed.shared_seeds() is not None and dropout_seed.pooling()
    assert counter.count == 2  # a second draw when the first runs out
    first = seeds[0]._base
    assert all(s.shape == (1,) and s.dtype == torch.int64 for s in seeds)
    assert all(s._base is first for s in seeds[:dropout_seed.SEEDS_PER_DRAW])
    values = torch.cat(seeds)
    assert values.unique().numel() == values.numel() and int(values.min()) >= 0
    assert all(s.data_ptr() % 16 == 0 for s in seeds)  # Triton's pointer specialisation: one variant
    assert not dropout_seed.pooling()


def test_nested_scopes_share_the_outer_pool():
    with dropout_seed.shared_seeds():
        outer = dropout_seed.next_seed(CPU)
        with dropout_seed.shared_seeds():
            inner = dropout_seed.next_seed(CPU)
        after = dropout_seed.next_seed(CPU)
    assert inner._base is outer._base is after._base
    assert inner.data_ptr() == outer.data_ptr() + 16 and after.data_ptr() == inner.data_ptr() + 16


def _scope_seeds(calls):
    with dropout_seed.shared_seeds():
        return torch.cat([dropout_seed.next_seed(CPU) for _ in range(calls)])


def test_same_generator_state_same_seeds_and_nothing_carried_to_the_next_scope():
    torch.manual_seed(7)
    first, second = _scope_seeds(5), _scope_seeds(5)
    state = torch.get_rng_state()  # a step boundary: what a checkpoint saves
    third = _scope_seeds(5)
    torch.manual_seed(7)
    assert torch.equal(_scope_seeds(5), first) and torch.equal(_scope_seeds(5), second)
    assert not torch.equal(first, second)
    torch.set_rng_state(state)  # a resumed run: the pool of the scope before is not needed
    assert torch.equal(_scope_seeds(5), third)


def test_outside_a_scope_each_call_draws_as_before():
    torch.manual_seed(5)
    expected = [torch.randint(0, 2**62, (1,), dtype=torch.int64), torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)]
    torch.manual_seed(5)
    with RandintCounter() as counter:
        drawn = [dropout_seed.next_seed(CPU), dropout_seed.next_seed(CPU, high=2**31 - 1)]
    assert counter.count == 2 and all(s._base is None for s in drawn)
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))


def test_draw_seed_keeps_given_seeds_and_the_launch_free_placeholder():
    given = torch.tensor([41])
    with dropout_seed.shared_seeds(), RandintCounter() as counter:
        copied = draw_seed(0.1, given, CPU)
        placeholder = draw_seed(0.0, None, CPU)
        pooled = draw_seed(0.1, None, CPU)
    assert torch.equal(copied, given) and copied.data_ptr() != given.data_ptr()
    assert placeholder.shape == (1,) and placeholder._base is None
    assert pooled._base is not None and counter.count == 1  # the pool's one draw, none for the others


def test_a_capturing_stream_draws_its_own_seed(monkeypatch):
    monkeypatch.setattr(dropout_seed, "_capturing", lambda device: True)
    with dropout_seed.shared_seeds(), RandintCounter() as counter:
        seeds = [dropout_seed.next_seed(CPU) for _ in range(3)]
    assert counter.count == 3 and all(s._base is None for s in seeds)


def test_compiled_scope_draws_per_call_without_recompiles():
    torch._dynamo.reset()
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    @torch.compile(fullgraph=True, backend=backend)
    def step(x):
        with dropout_seed.shared_seeds():
            return x + sum(dropout_seed.next_seed(x.device) % 7 for _ in range(4))

    torch.manual_seed(0)
    outputs = [step(torch.zeros(2, dtype=torch.int64)) for _ in range(3)]
    assert len(compiles) == 1 and not dropout_seed.pooling()
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])  # fresh draws every call


def _model(checkpointing=False):
    torch.manual_seed(0)
    model = ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL), validate_values=False).train()
    return set_gradient_checkpointing(model, checkpointing)


def _step(model, batch, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with fastvl.use_backend(**TRITON):  # the recomputation in the backward dispatches like the forward
        loss = model(**batch).loss
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_a_model_forward_draws_its_seeds_once(generator):
    from fastvl.bench.host import LaunchCounter, stubbed_triton  # counts inside fastvl's custom ops too

    model, batch = _model(), _batch(generator)
    counter = LaunchCounter()
    with fastvl.use_backend(**TRITON), stubbed_triton(counter), counter:
        model(**batch).loss.backward()
    assert counter.by_op.get("randint") == 1 and counter.triton > 10


@pytest.mark.slow
@pytest.mark.interpret
def test_model_dropout_is_reproducible_and_checkpointing_replays_the_seeds(generator):
    batch = _batch(generator, batch=1, text_len=9, regions=7)
    plain, checkpointed = _model(), _model(checkpointing=True)
    loss, grads = _step(plain, batch, seed=1)
    again_loss, again_grads = _step(plain, batch, seed=1)
    assert torch.equal(loss, again_loss) and all(map(torch.equal, grads, again_grads))
    ck_loss, ck_grads = _step(checkpointed, batch, seed=1)  # recomputed layers must see the same masks
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=0)
    for a, b in zip(ck_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _vlbert_forward(generator):
    from test_vlbert import CONFIG, inputs

    from fastvl.models.vlbert import VLBERT

    ids, features, boxes, region_mask = inputs(generator)
    model = VLBERT(CONFIG).train()
    return lambda: model(ids, features.nan_to_num(), boxes, region_mask=region_mask).sequence.float().sum()


def _albef_forward(generator):
    from test_albef import CONFIG, batch

    from fastvl.models.albef import ALBEFClassifier

    images, ids = batch(generator, size=2)
    model = ALBEFClassifier(CONFIG, num_classes=3).train()
    return lambda: model(images, ids, labels=torch.tensor([0, 2]))["loss"]


@pytest.mark.parametrize("forward", [_vlbert_forward, _albef_forward], ids=["vlbert", "albef"])
def test_every_model_forward_draws_its_seeds_once(generator, forward):
    """VL-BERT's and ALBEF's forwards (``on_backend`` methods) share one pool like ViLBERT's."""
    from fastvl.bench.host import LaunchCounter, stubbed_triton

    run = forward(generator)
    counter = LaunchCounter()
    with fastvl.use_backend(**TRITON), stubbed_triton(counter), counter:
        run().backward()
    assert counter.by_op.get("randint") == 1 and counter.triton > 10
