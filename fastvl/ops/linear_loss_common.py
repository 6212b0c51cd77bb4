"""Projection + row loss without the full logits: the engine of ``linear_region_kl_loss`` and
``linear_cross_entropy``'s fused backends.

Only the selected rows (masked regions, non-ignored labels) are projected, ``chunk_rows`` at a time:
for each chunk, ``logits = h @ W.T + b`` (torch matmul), the fused row kernel turns them in place into
their gradient while computing the loss, and that gradient is folded at once into ``grad_hidden``,
``grad_weight`` and ``grad_bias``. Neither the ``[N, C]`` logits nor their gradient ever exist; the
largest temporary is one ``[chunk_rows, C]`` chunk. For 'mean' and 'sum' the gradients are computed
in the forward (for an upstream gradient of 1, scaled in the backward); for 'none' the backward
recomputes the chunks with the per-row upstream gradient as the row scale.

On CPU only the selected rows are projected (their count is read without a sync). On CUDA and under
torch.compile every row is projected in place, unselected ones scored 0: no host sync and fixed
shapes (CUDA graphs can capture it), at the price of the unscored rows' GEMM FLOPs. The masked count
that divides the mean stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastvl import _checks
from fastvl.ops import eager_path

# Default chunk: about 16M logits (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24

# kind -> row loss: (backend, logits [n, C], targets [n, ...], selected bool [n] or None (= every row),
# scale fp32 [1] or [n], grad [n, C] or None) -> fp32 [n], 0 with a zero gradient on unselected rows.
# Filled by the op modules ("kl": region_kl, "ce": cross-entropy).
ROW_LOSSES: dict[str, Callable] = {}


def validate_projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, classes: str) -> None:
    _checks.tensor("hidden", hidden, shape="[..., K]", ndim=range(1, 8))
    _checks.tensor("weight", weight, shape=f"[{classes}, K]", ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [{classes}, K] with K = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {list(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, shape=f"[{classes}]", ndim=1)
        _checks.same_shape("bias", bias, [weight.shape[0]], f"[{classes}] with {classes} = weight.shape[0]")
    _checks.same_device("hidden", hidden, weight=weight, bias=bias)
    _checks.same_dtype("hidden", hidden, weight=weight, bias=bias)
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [{classes}, K] with {classes} >= 1 classes, got {list(weight.shape)}")


def validate_chunk_rows(chunk_rows: int | None) -> None:
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")


def _project_chunks(kind: str, backend: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    target: torch.Tensor, selected: torch.Tensor, row_scale: torch.Tensor, with_grad: bool,
                    chunk_rows: int):
    """(per-row fp32 loss [N], grad_hidden, grad_weight, grad_bias); grads are None without ``with_grad``.
    ``row_scale``: fp32 [1] or [N], the factor of each row's gradient.

    Which rows are projected: where reading ``selected`` costs no sync (CPU tensors, eager), only the
    selected ones, gathered (their count sizes the loop); elsewhere (CUDA, torch.compile) every row, in
    place, chunk by chunk: fixed shapes and no host sync, the row kernel giving unselected rows a zero
    loss and gradient (the FLOPs of the unscored rows are the price: see the README)."""
    classes, features = weight.shape
    hidden2d = hidden.reshape(-1, features)
    total_rows = hidden2d.shape[0]
    per_row = target.shape[-1:] if target.dim() > selected.dim() else ()
    target2d = target.reshape(total_rows, *per_row)
    selected = selected.reshape(-1)
    gather = _checks.may_read_values(selected)
    rows = selected.nonzero().squeeze(1) if gather else None
    count = rows.numel() if gather else total_rows
    chunk = chunk_rows if chunk_rows > 0 else max(1, CHUNK_ELEMENTS // max(classes, 1))
    row_loss_fn = ROW_LOSSES[kind]
    in_place = not gather and count <= chunk  # one chunk over every row: its results are the outputs
    row_loss = None if in_place else torch.zeros(total_rows, dtype=torch.float32, device=hidden.device)
    # grad_weight / grad_bias (fp32) are the first chunk's products, the later chunks' added in place
    grad_hidden = grad_weight = grad_bias = None
    if with_grad and not in_place:
        grad_hidden = torch.zeros_like(hidden2d)
    for start in range(0, count, chunk):
        if gather:
            ids = rows[start:start + chunk]
            h, t, chosen = hidden2d.index_select(0, ids), target2d.index_select(0, ids), None
            scale = row_scale if row_scale.numel() == 1 else row_scale.index_select(0, ids)
        else:
            part = slice(start, start + chunk)
            h, t, chosen = hidden2d[part], target2d[part], selected[part]
            scale = row_scale if row_scale.numel() == 1 else row_scale[part]
        logits = F.linear(h, weight, bias)
        # With grad, the row kernel overwrites the logits with d loss / d logits (times scale).
        losses = row_loss_fn(backend, logits, t, chosen, scale, logits if with_grad else None)
        if in_place:
            row_loss = losses
        elif gather:
            row_loss.index_copy_(0, ids, losses)
        else:
            row_loss[part] = losses
        if not with_grad:
            continue
        grad_logits = logits
        if in_place:
            grad_hidden = grad_logits @ weight
        elif gather:
            grad_hidden.index_copy_(0, ids, grad_logits @ weight)
        else:
            torch.mm(grad_logits, weight, out=grad_hidden[part])
        if grad_weight is None:
            grad_weight = (grad_logits.t() @ h).float()
        elif grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.t(), h)
        else:
            grad_weight += (grad_logits.t() @ h).float()
        if bias is not None:
            bias_part = grad_logits.sum(0, dtype=torch.float32)
            grad_bias = bias_part if grad_bias is None else grad_bias.add_(bias_part)
    if row_loss is None:  # no rows at all
        row_loss = torch.zeros(total_rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden2d) if with_grad else None
    if with_grad and grad_weight is None:  # no row selected (CPU)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(classes, dtype=torch.float32, device=weight.device) if bias is not None else None
    if with_grad:
        grad_hidden = grad_hidden.view(hidden.shape)
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
    return row_loss, grad_hidden, grad_weight, grad_bias


def mean_scale(count: torch.Tensor, reduction: str) -> torch.Tensor:
    """fp32 [1]: the gradient factor of every scored row (1/count for 'mean', kept on the device)."""
    if reduction == "mean":
        return (1.0 / count.clamp_min(1).float()).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=count.device)


def _linear_loss_compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         selected: torch.Tensor, kind: str, reduction: str, backend: str, with_grad: bool,
                         chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) for an upstream gradient of 1; the grads are empty
    without ``with_grad`` or for reduction 'none' (its backward recomputes)."""
    with_grad = with_grad and reduction != "none"
    with torch.no_grad():
        scale = mean_scale(selected.sum() if reduction == "mean" else selected, reduction)
        row_loss, grad_hidden, grad_weight, grad_bias = _project_chunks(
            kind, backend, hidden, weight, bias, target, selected, scale, with_grad, chunk_rows)
        if reduction == "none":
            loss = row_loss.view(selected.shape).to(hidden.dtype)
        else:
            loss = row_loss.sum()
            if reduction == "mean":
                loss = (loss * scale).reshape(())  # 1 / count, kept on the device
            loss = loss.to(hidden.dtype)
    return tuple(t if t is not None else hidden.new_empty(0) for t in (loss, grad_hidden, grad_weight, grad_bias))


@torch.library.custom_op("fastvl::linear_loss_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _linear_loss_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                     selected: torch.Tensor, kind: str, reduction: str, backend: str, with_grad: bool,
                     chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_loss_compute(hidden, weight, bias, target, selected, kind, reduction, backend, with_grad,
                                chunk_rows)


@_linear_loss_fwd.register_fake
def _(hidden, weight, bias, target, selected, kind, reduction, backend, with_grad, chunk_rows):
    loss = hidden.new_empty(selected.shape if reduction == "none" else ())
    if not with_grad or reduction == "none":
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (loss, torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def _linear_loss_recompute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                           selected: torch.Tensor, kind: str, backend: str, grad_rows: torch.Tensor,
                           chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_rows * per-row loss)`` (reduction 'none'), recomputed chunk by chunk."""
    with torch.no_grad():
        _, grad_hidden, grad_weight, grad_bias = _project_chunks(
            kind, backend, hidden, weight, bias, target, selected, grad_rows.reshape(-1).float().contiguous(), True,
            chunk_rows)
    return grad_hidden, grad_weight, grad_bias if grad_bias is not None else hidden.new_empty(0)


@torch.library.custom_op("fastvl::linear_loss_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _linear_loss_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                     selected: torch.Tensor, kind: str, backend: str, grad_rows: torch.Tensor,
                     chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_loss_recompute(hidden, weight, bias, target, selected, kind, backend, grad_rows, chunk_rows)


@_linear_loss_bwd.register_fake
def _(hidden, weight, bias, target, selected, kind, backend, grad_rows, chunk_rows):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, selected, kind, reduction, backend, with_grad, chunk_rows = inputs
    ctx.reduction, ctx.kind, ctx.backend, ctx.chunk_rows = reduction, kind, backend, chunk_rows
    ctx.has_bias = bias is not None
    ctx.consumed = False
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, selected)
    else:
        ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: no zero-filled buffers


def _backward(ctx, grad_loss, *_grads_of_grads):
    if ctx.reduction == "none":
        hidden, weight, bias, target, selected = ctx.saved_tensors
        recompute = _linear_loss_recompute if getattr(ctx, "eager", False) else _linear_loss_bwd
        grad_hidden, grad_weight, grad_bias = recompute(hidden, weight, bias, target, selected, ctx.kind,
                                                               ctx.backend, grad_loss, ctx.chunk_rows)
    else:
        # The gradients were computed in the forward for an upstream gradient of 1: scale them in place
        # (no second copy of grad_weight), which allows one backward per forward.
        if ctx.consumed:
            raise RuntimeError("fastvl fused linear losses support one backward per forward (no retain_graph reuse)")
        ctx.consumed = True
        grad_hidden, grad_weight, grad_bias = (g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
    return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 7


_linear_loss_fwd.register_autograd(_backward, setup_context=_setup_context)
_EagerLinearLoss = eager_path.eager_function("_EagerLinearLoss", _linear_loss_compute, _setup_context, _backward,
                                             outputs=4)


def apply(kind: str, backend: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          target: torch.Tensor, selected: torch.Tensor, reduction: str, chunk_rows: int | None) -> torch.Tensor:
    """The fused projection + loss: ``selected`` (bool, hidden's leading shape) picks the scored rows;
    ``target`` holds each row's target (probabilities ``[..., C]`` or labels ``[...]``)."""
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return eager_path.call(_linear_loss_fwd, _EagerLinearLoss, hidden, weight, bias, target, selected, kind,
                           reduction, backend, with_grad, chunk_rows or 0)
