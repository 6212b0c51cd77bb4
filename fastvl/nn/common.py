"""Building blocks shared by fastvl's layers: the fused LayerNorm and feed-forward modules, BERT's
weight initialisation, activation checkpointing, mask normalisation, and the models' ``backend=``."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastvl import _checks
from fastvl.dispatch import use_backend
from fastvl.ops import bias_gelu, dropout_seed, layer_norm


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(hidden, eps)`` (same parameters, ``weight`` / ``bias``) whose forward can
    also take the sub-layer's residual and dropout: ``forward(x, residual, dropout_p)`` =
    ``LN(dropout(x) + residual)`` through :func:`fastvl.ops.layer_norm`. BERT's eps is 1e-12."""

    def __init__(self, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, residual, dropout_p if self.training else 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _LinearSharingInput(torch.autograd.Function):
    """(``x @ W.T (+ b)``, ``x``) of rows ``x [N, in]`` where a residual branch reads the second output:
    the backward adds the residual's gradient inside the input gradient's GEMM (one addmm, not mm + add)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros (a launch)
        return F.linear(x, weight, bias), x.view_as(x)

    @staticmethod
    def backward(ctx, grad_y, grad_residual):
        if grad_y is None:
            return grad_residual, None, None
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight if grad_residual is None else torch.addmm(grad_residual, grad_y, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_y.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_weight, grad_bias


def linear_sharing_input(x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``F.linear(x, weight, bias)``, ``x`` for a residual branch): the same values and gradients, one
    launch fewer in the backward (the residual's gradient is accumulated by the input gradient's GEMM).
    Plain ``F.linear`` under torch.compile (which fuses the add itself), autocast or mixed dtypes
    (the GEMM's operands are not the input's dtype), and for a non-contiguous x."""
    if (torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or not torch.is_grad_enabled()
            or x.dtype != weight.dtype or not x.is_contiguous()):
        return F.linear(x, weight, bias), x
    # on rows, so that y is the function's own output (not a view of a tensor autograd never saw: the
    # attention ops find a fused projection through y's views' ``_base``)
    y, residual = _LinearSharingInput.apply(x.view(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0]), residual.view(x.shape)


class InputSharingLinear(nn.Linear):
    """``torch.nn.Linear`` (same parameters) whose input also feeds a residual branch: ``forward(x)``
    returns ``(x @ W.T + b, x)``, the residual read from the second (:func:`linear_sharing_input`:
    one backward launch fewer). Computed in the module's own forward (DeepSpeed ZeRO-3 gathers it)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_sharing_input(x, self.weight, self.bias)


class LinearGELU(nn.Linear):
    """``gelu(x @ W.T + b)`` (erf GELU): ``torch.nn.Linear`` (same parameters) followed by BERT's
    activation, with the bias add and the GELU fused into one epilogue (:func:`fastvl.ops.bias_gelu`).
    Computed in the module's own forward, so DeepSpeed ZeRO-3 gathers its weights. With
    ``shares_input=True`` it returns ``(gelu(...), x)`` for a residual branch to read x from
    (:func:`linear_sharing_input`)."""

    def __init__(self, in_features: int, out_features: int, *, shares_input: bool = False, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.shares_input = shares_input

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.shares_input:
            y, x = linear_sharing_input(x, self.weight)
            return bias_gelu(y, self.bias), x
        return bias_gelu(F.linear(x, self.weight), self.bias)


class Checkpointable(nn.Module):
    """A layer whose forward can run under activation checkpointing (``torch.utils.checkpoint`` with
    ``use_reentrant=False``): set ``layer.gradient_checkpointing = True`` (or call
    :func:`set_gradient_checkpointing` on a model). Only active in training mode with grad enabled.
    Dropout replays exactly in the recomputation (checkpoint restores the RNG state, and the seeds
    taken from a forward's seed pool are replayed: :func:`fastvl.ops.dropout_seed.checkpoint_contexts`)."""

    gradient_checkpointing: bool = False

    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if dropout_seed.pooling():
                return checkpoint(self.compute, *args, use_reentrant=False,
                                  context_fn=dropout_seed.checkpoint_contexts, **kwargs)
            return checkpoint(self.compute, *args, use_reentrant=False, **kwargs)
        return self.compute(*args, **kwargs)

    def compute(self, *args, **kwargs):
        raise NotImplementedError


def set_gradient_checkpointing(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns activation checkpointing on (or off) for every checkpointable layer inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, Checkpointable):
            sub.gradient_checkpointing = enabled
    return module


class FeedForward(nn.Module):
    """BERT's ``BertIntermediate`` + ``BertOutput``: ``LN(dropout(W2 gelu(W1 x + b1) + b2) + x)``, with
    the bias + GELU and the residual + dropout + LN as fused epilogues.

    Parameters: ``intermediate`` (:class:`LinearGELU` hidden -> intermediate), ``output`` (Linear
    intermediate -> hidden), ``norm``. Works on ``[..., hidden]`` (padded or packed rows alike).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.1, eps: float = 1e-12,
                 activation: str = "gelu"):
        super().__init__()
        if activation != "gelu":
            raise ValueError(f"activation must be 'gelu' (BERT's erf GELU), got {activation!r}")
        self.dropout = dropout
        self.intermediate = LinearGELU(hidden_size, intermediate_size, shares_input=True)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, x = self.intermediate(x)
        return self.norm(self.output(hidden), x, self.dropout)


def zero_one_mask(name: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    """An integer 0 / 1 mask (the original projects' and Hugging Face's ``attention_mask``, 1 = real)
    as bool; bool and float (additive) masks pass unchanged. Other integers are an error naming
    ``name`` (checked with one host sync, skipped under torch.compile)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    if not torch.compiler.is_compiling():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must be bool or hold 0 / 1 integers (1 = real), got the value "
                             f"{mask[bad][0].item()} (at {bad.nonzero()[0].tolist()})")
    return mask != 0


def bool_mask(name: str, mask: torch.Tensor | None, batch: int, length: int,
              device: torch.device) -> torch.Tensor | None:
    """A key padding mask as bool ``[B, L]`` (True = real); accepts 0 / 1 integers and the original
    additive float form (0 = real, -10000 = padded) too."""
    return _checks.key_padding_mask(name, zero_one_mask(name, mask), batch, length, device)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., H * D]`` -> ``[..., H, D]`` (a view)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: Linear / Embedding weights ~ N(0, std), biases 0, LayerNorm 1 / 0.

    Use as ``model.apply(lambda m: init_bert_weights(m, config.initializer_range))``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
    if isinstance(module, (LayerNorm, nn.LayerNorm)):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


def on_backend(method):
    """Runs a model's method (``forward`` and friends) under ``use_backend(self.backend)`` when the
    model was built with ``backend=`` (e.g. "reference", the parity baseline; None = auto), with its
    fused ops' dropout seeds drawn in one launch (:func:`fastvl.ops.dropout_seed.shared_seeds`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with dropout_seed.shared_seeds():
            if self.backend is None:
                return method(self, *args, **kwargs)
            with use_backend(self.backend):
                return method(self, *args, **kwargs)

    return run
