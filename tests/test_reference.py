"""The reference ops against independent formulas (written differently from the references)."""

import math

import pytest
import torch

from fastvl import reference as ref


def _independent_attention(q, k, v, keep):
    """Per (batch, head, query) loop with an explicit log-sum-exp; rows with no key give zeros."""
    batch, len_q, heads, dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(len_q):
                valid = keep[b].nonzero().flatten()
                if len(valid) == 0:
                    continue
                scores = torch.stack([q[b, i, h] @ k[b, j, h] for j in valid.tolist()]) / math.sqrt(dim)
                weights = torch.exp(scores - torch.logsumexp(scores, 0))
                out[b, i, h] = (weights[:, None] * v[b, valid, h]).sum(0)
    return out


@pytest.mark.parametrize("len_q,len_k", [(5, 7), (1, 3), (7, 7)])
def test_attention_matches_loop(generator, len_q, len_k):
    q, k, v = (torch.randn(2, n, 3, 8, generator=generator, dtype=torch.float64) for n in (len_q, len_k, len_k))
    keep = torch.ones(2, len_k, dtype=torch.bool)
    keep[0, len_k // 2 + 1:] = False
    keep[1] = False  # every key of batch 1 padded -> zeros
    expected = _independent_attention(q, k, v, keep)
    torch.testing.assert_close(ref.attention_ref(q, k, v, keep), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref.attention_ref(q, k, v, keep)[1], torch.zeros_like(q[1]))


def test_attention_dropout_mask_replays(generator):
    q, k, v = (torch.randn(1, 4, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(1, 2, 4, 4, generator=generator) > 0.3
    out, probs = ref.attention_ref(q, k, v, dropout_p=0.3, dropout_mask=keep, return_probs=True)
    clean = ref.attention_ref(q, k, v, return_probs=True)[1]
    torch.testing.assert_close(probs, clean * keep / 0.7)


def test_varlen_equals_padded(generator):
    lengths_q, lengths_k = [3, 1, 5], [4, 6, 2]
    q = torch.randn(sum(lengths_q), 2, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(sum(lengths_k), 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 10, 12], dtype=torch.int32)
    packed = ref.varlen_attention_ref(q, k, v, cu_q, cu_k)
    for i in range(3):
        padded_k = torch.zeros(1, 6, 2, 8, dtype=torch.float64)
        padded_v = torch.zeros_like(padded_k)
        padded_k[0, : lengths_k[i]] = k[cu_k[i]: cu_k[i + 1]]
        padded_v[0, : lengths_k[i]] = v[cu_k[i]: cu_k[i + 1]]
        mask = torch.arange(6)[None] < lengths_k[i]
        expected = ref.attention_ref(q[None, cu_q[i]: cu_q[i + 1]], padded_k, padded_v, mask)[0]
        torch.testing.assert_close(packed[cu_q[i]: cu_q[i + 1]], expected)


def test_co_attention_directions(generator):
    q_v, k_v, v_v = (torch.randn(2, 5, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    q_t, k_t, v_t = (torch.randn(2, 3, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    mask_v = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask_t = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    ctx_v, ctx_t = ref.co_attention_ref(q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t)
    torch.testing.assert_close(ctx_v, _independent_attention(q_v, k_t, v_t, mask_t))
    torch.testing.assert_close(ctx_t, _independent_attention(q_t, k_v, v_v, mask_v))


def _independent_kl(logits, target, mask):
    log_q = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    per_region = torch.special.xlogy(target, target).sum(-1) - (target * log_q).sum(-1)
    count = mask.sum()
    return (per_region * mask).sum() / count if count > 0 else torch.zeros((), dtype=logits.dtype)


@pytest.mark.parametrize("masked", ["none", "one", "some", "all"])
def test_region_kl_matches_formula(generator, masked):
    logits = torch.randn(3, 37, 11, generator=generator, dtype=torch.float64) * 4
    target = torch.softmax(torch.randn(3, 37, 11, generator=generator, dtype=torch.float64), -1)
    target[..., 0] = 0.0  # exact zeros
    target = target / target.sum(-1, keepdim=True)
    mask = {"none": torch.zeros(3, 37, dtype=torch.bool), "one": torch.zeros(3, 37, dtype=torch.bool),
            "some": torch.rand(3, 37, generator=generator) < 0.15, "all": torch.ones(3, 37, dtype=torch.bool)}[masked]
    if masked == "one":
        mask[1, 7] = True
    logits.requires_grad_(True)
    loss = ref.region_kl_loss_ref(logits, target, mask)
    torch.testing.assert_close(loss, _independent_kl(logits.detach(), target, mask))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    if masked == "none":
        assert loss.item() == 0.0 and not logits.grad.any()


def test_linear_cross_entropy_matches_formula(generator):
    hidden = torch.randn(2, 23, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(50, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 23), generator=generator)
    labels[torch.rand(2, 23, generator=generator) < 0.8] = -1
    logits = hidden @ weight.T + bias
    keep = labels != -1
    picked = logits[keep].gather(1, labels[keep][:, None])[:, 0]
    expected = (torch.logsumexp(logits[keep], -1) - picked).mean()
    torch.testing.assert_close(ref.linear_cross_entropy_ref(hidden, weight, bias, labels), expected)
    all_ignored = torch.full_like(labels, -1)
    assert ref.linear_cross_entropy_ref(hidden, weight, bias, all_ignored).item() == 0.0


def test_itc_matches_formula(generator):
    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    img, txt, img_m, txt_m = unit(4, 8), unit(4, 8), unit(4, 8), unit(4, 8)
    img_queue, txt_queue = unit(12, 8).T, unit(12, 8).T
    temp, alpha = 0.07, 0.4
    loss = ref.itc_loss_ref(img, txt, img_queue, txt_queue, temp, alpha, img_m, txt_m)
    expected = 0.0
    for a, a_m, others_m, queue in ((img, img_m, txt_m, txt_queue), (txt, txt_m, img_m, img_queue)):
        bank = torch.cat([others_m, queue.T])  # momentum features of the batch, then the queue
        for i in range(4):
            target = alpha * torch.softmax(a_m[i] @ bank.T / temp, 0)
            target[i] += 1 - alpha
            expected += -(target * torch.log_softmax(a[i] @ bank.T / temp, 0)).sum() / 8
    torch.testing.assert_close(loss, expected)


def test_queue_update_wraps(generator):
    img_queue, txt_queue = torch.zeros(3, 8), torch.zeros(3, 8)
    ptr = torch.tensor([6])
    feats = torch.arange(12.0).view(4, 3)
    ref.itc_queue_update_ref(img_queue, txt_queue, ptr, feats, -feats)
    assert ptr.item() == 2
    torch.testing.assert_close(img_queue[:, [6, 7, 0, 1]], feats.T)
    torch.testing.assert_close(txt_queue[:, [6, 7, 0, 1]], -feats.T)


def test_hard_negatives_never_pick_the_positive(generator):
    sim_i2t = torch.randn(6, 20, generator=generator) * 5
    sim_t2i = torch.randn(6, 20, generator=generator) * 5
    for _ in range(20):
        neg_txt, neg_img = ref.itm_hard_negatives_ref(sim_i2t, sim_t2i, generator)
        assert not (neg_txt == torch.arange(6)).any() and not (neg_img == torch.arange(6)).any()
