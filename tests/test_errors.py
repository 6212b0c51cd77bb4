"""Bad input to every public op raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

from fastvl import ops


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


ATTENTION_CASES = [
    (lambda: ops.attention(t(2, 5, 4), t(2, 5, 4), t(2, 5, 4)), ValueError, r"q must have shape \[B, Lq, H, D\]"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 3, 8), t(2, 6, 3, 8)), ValueError, r"k must have shape .*H=4, D=8"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(3, 6, 4, 8), t(3, 6, 4, 8)), ValueError, "same batch size"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 16)), ValueError, "v must have shape"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 8), torch.ones(2, 5, dtype=torch.bool)),
     ValueError, r"key_padding_mask must have shape \[B, L\] = \[2, 6\]"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 8), torch.ones(2, 6, dtype=torch.int64)),
     TypeError, "key_padding_mask must be bool"),
    (lambda: ops.attention(torch.ones(2, 5, 4, 8, dtype=torch.int64), t(2, 6, 4, 8), t(2, 6, 4, 8)),
     TypeError, "q must have a dtype in"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8, dtype=torch.float16), t(2, 6, 4, 8)), TypeError,
     "k has dtype"),
    (lambda: ops.attention(t(2, 5, 4, 8), t(2, 6, 4, 8), t(2, 6, 4, 8), dropout_p=1.5), ValueError, "dropout_p"),
    (lambda: ops.attention(t(7, 2, 8), t(9, 2, 8), t(9, 2, 8), cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "never decrease"),
    (lambda: ops.attention(t(7, 2, 8), t(9, 2, 8), t(9, 2, 8), cu_seqlens_q=torch.tensor([0, 4, 6], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 6 must equal the packed length 7"),
    (lambda: ops.attention(t(7, 2, 8), t(9, 2, 8), t(9, 2, 8), cu_seqlens_q=torch.tensor([0.0, 7.0]),
                           cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), TypeError, "cu_seqlens_q must be an int32"),
]

CO_ATTENTION_CASES = [
    (lambda: ops.co_attention(t(2, 5, 4, 8), t(2, 5, 4, 8), t(2, 5, 4, 8), None, t(2, 3, 2, 8), t(2, 3, 2, 8),
                              t(2, 3, 2, 8), None), ValueError, r"q_t must have shape \[B, Lt, H, D\]"),
    (lambda: ops.co_attention(t(2, 5, 4, 8), t(2, 5, 4, 8), t(2, 5, 4, 8), torch.ones(2, 3, dtype=torch.bool),
                              t(2, 3, 4, 8), t(2, 3, 4, 8), t(2, 3, 4, 8), None), ValueError, "mask_v must have shape"),
    (lambda: ops.co_attention(t(2, 5, 4, 8), t(2, 5, 4, 8), t(2, 5, 4, 8), None, t(3, 3, 4, 8), t(3, 3, 4, 8),
                              t(3, 3, 4, 8), None), ValueError, "q_t must have shape"),
]

LOSS_CASES = [
    (lambda: ops.region_kl_loss(t(2, 5, 7), t(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)), ValueError,
     "target_probs must have shape"),
    (lambda: ops.region_kl_loss(t(2, 5, 7), t(2, 5, 7), torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "region_mask must have shape"),
    (lambda: ops.region_kl_loss(t(2, 5, 7), t(2, 5, 7), torch.ones(2, 5, dtype=torch.bool), reduction="avg"),
     ValueError, "reduction must be one of"),
    (lambda: ops.linear_region_kl_loss(t(2, 5, 8), t(7, 9), None, t(2, 5, 7), torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "weight must have shape"),
    (lambda: ops.linear_cross_entropy(t(2, 5, 8), t(30, 8), t(29), torch.zeros(2, 5, dtype=torch.int64)),
     ValueError, "bias must have shape"),
    (lambda: ops.linear_cross_entropy(t(2, 5, 8), t(30, 8), None, torch.zeros(2, 5)), TypeError, "labels must have a dtype"),
    (lambda: ops.itc_loss(t(4, 8), t(4, 8), t(8, 16), t(8, 16), -0.07, 0.4, t(4, 8), t(4, 8)), ValueError,
     "temp must be > 0"),
    (lambda: ops.itc_loss(t(4, 8), t(4, 8), t(16, 8), t(16, 8), 0.07, 0.4, t(4, 8), t(4, 8)), ValueError,
     r"img_queue must have shape \[E, Q\]"),
    (lambda: ops.itc_loss(t(4, 8), t(3, 8), t(8, 16), t(8, 16), 0.07, 0.4, t(4, 8), t(4, 8)), ValueError,
     "txt_feat must have shape"),
]


@pytest.mark.parametrize("call,error,message", ATTENTION_CASES + CO_ATTENTION_CASES + LOSS_CASES)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_additive_mask_is_converted():
    q = t(2, 3, 2, 8)
    k = t(2, 4, 2, 8)
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    additive = (1.0 - keep.float())[:, None, None, :] * -10000.0
    torch.testing.assert_close(ops.attention(q, k, k, additive), ops.attention(q, k, k, keep))
