"""The papers' optimiser and learning-rate schedules as named presets.

* ``vilbert``: AdamW lr 1e-4, betas (0.9, 0.98), eps 1e-8, weight decay 0.01 (not on biases and
  LayerNorm), linear warm-up over the first 10% of the steps, then linear decay to 0.
* ``vlbert``: AdamW lr 1e-4 (VL-BERT scales it with the batch), betas (0.9, 0.999), eps 1e-6,
  weight decay 1e-4, linear warm-up over 16k steps (capped at 10% of a short run), linear decay,
  gradient clipping 10.
* ``albef``: AdamW lr 1e-4, weight decay 0.02, warm-up from 1e-5 to 1e-4 over 2000 steps (capped at
  10% of a short run), then cosine to 1e-5.

The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` that DeepSpeed steps once per optimizer
step and saves in its checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch


@dataclasses.dataclass(frozen=True)
class Preset:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup: float  # fraction of the run if < 1, else steps
    shape: str  # "linear" (to 0) or "cosine" (to min_lr)
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0
    gradient_clipping: float = 1.0


PRESETS = {
    "vilbert": Preset(1e-4, (0.9, 0.98), 1e-8, 0.01, 0.1, "linear"),
    "vlbert": Preset(1e-4, (0.9, 0.999), 1e-6, 1e-4, 16000, "linear", gradient_clipping=10.0),
    "albef": Preset(1e-4, (0.9, 0.999), 1e-8, 0.02, 2000, "cosine", warmup_start_lr=1e-5, min_lr=1e-5),
}


def warmup_steps(preset: Preset, total_steps: int) -> int:
    if preset.warmup < 1:
        return int(round(preset.warmup * total_steps))
    return min(int(preset.warmup), int(round(0.1 * total_steps)))


def lr_factor(step: int, total_steps: int, warmup: int, preset: Preset, lr: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup:
        start = preset.warmup_start_lr / lr
        return start + (1.0 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if preset.shape == "linear":
        return 1.0 - progress
    floor = preset.min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, LayerNorm or other 1-d parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, preset: Preset, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, preset.weight_decay), lr=lr or preset.lr, betas=preset.betas,
                             eps=preset.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, preset: Preset, total_steps: int,
                   warmup: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    lr = optimizer.param_groups[0]["lr"]
    warmup = warmup_steps(preset, total_steps) if warmup is None else warmup
    schedule = functools.partial(lr_factor, total_steps=total_steps, warmup=warmup, preset=preset, lr=lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
