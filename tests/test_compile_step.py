"""torch.compile over a whole training step (issue 13): forward, losses and backward of ViLBERT-tiny
with the fused ops (Triton row kernels under the interpreter, the C++ losses) in one graph
(``fullgraph=True``: no graph break in the ops), with the eager step's loss and gradients; and
``fastvl pretrain --compile``'s mode choice."""

import pytest
import torch
from test_vilbert import SMALL, _batch, _perturb

import fastvl
from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForPretraining
from fastvl.train.cli import compile_mode

FUSED = dict(layer_norm="triton", bias_gelu="triton", region_kl_loss="cpp", linear_region_kl_loss="cpp",
             linear_cross_entropy="cpp", itc_loss="cpp", attention="sdpa", co_attention="sdpa")


@pytest.mark.slow
@pytest.mark.interpret
def test_fullgraph_training_step_matches_eager(generator):
    torch.manual_seed(0)
    model = _perturb(ViLBERTForPretraining(ViLBERTConfig.named("tiny", **SMALL), validate_values=False))
    batch = _batch(generator)
    chosen = []

    def step(**inputs):
        with fastvl.use_backend(**FUSED):
            loss = model(**inputs).loss
        loss.backward()
        return loss.detach()

    def gradients():
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=False)
        return grads

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with fastvl.dispatch.listen(lambda event, impl: chosen.append((event.op, event.backend))):
        eager_loss = step(**batch)
    assert {op for op, backend in chosen if backend in ("triton", "cpp")} >= {"layer_norm", "bias_gelu",
                                                                                "linear_cross_entropy"}
    eager_grads = gradients()
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # Tensor.backward() inside the graph
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled_loss = compiled(**batch)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(gradients(), eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_pretrain_compile_mode():
    assert compile_mode("cuda") == "reduce-overhead"  # CUDA graphs: the step is host-bound
    assert compile_mode("cpu") == "default"
