"""Dropout keep-mask on the short-sequence path: stored bit-packed by the forward vs regenerated from the
Philox seed in the backward, fwd+bwd time of co-attention and text attention with dropout 0.1 at
ViLBERT-base shapes (B=64, 37 regions x 36 tokens; co-attention H=8 d=128, text attention H=12 d=64).

    python benchmarks/bench_dropout_mask.py               # GPU, bf16; writes dropout_mask_<device>.json
    python benchmarks/bench_dropout_mask.py --device cpu  # interpreter-free CPU run: only checks it runs

Bytes the stored masks add per call (written by the forward, read by the backward) are stated with the
times; ``FASTVL_DROPOUT_MASK=regenerate`` is how the second variant is selected (``stores_keep_mask``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import fastvl
from fastvl.bench import harness
from fastvl.ops import attention_launch

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, REGIONS, TOKENS, DROPOUT = 64, 37, 36, 0.1


def _inputs(device, dtype, heads, head_dim, lengths):
    return [torch.randn(BATCH, n, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for n in lengths]


def cases(device, dtype):
    """(name, fwd+bwd callable, leaves, mask bytes written by the forward)."""
    co = _inputs(device, dtype, 8, 128, (REGIONS,) * 3 + (TOKENS,) * 3)

    def co_attention():
        ctx_v, ctx_t = fastvl.ops.co_attention(*co[:3], None, *co[3:], None, DROPOUT)
        (ctx_v.sum() + ctx_t.sum()).backward()

    text = _inputs(device, dtype, 12, 64, (TOKENS,) * 3)

    def attention():
        fastvl.ops.attention(*text, dropout_p=DROPOUT).sum().backward()

    words = attention_launch.short_kernels().keep_words
    co_bytes = 4 * BATCH * 8 * (REGIONS * words(TOKENS) + TOKENS * words(REGIONS))
    text_bytes = 4 * BATCH * 12 * TOKENS * words(TOKENS)
    return [("co_attention_d128", co_attention, co, co_bytes), ("attention_d64", attention, text, text_bytes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=str(harness.default_device()))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rows = []
    for name, fn, leaves, mask_bytes in cases(args.device, dtype):
        for variant in ("store", "regenerate"):
            os.environ["FASTVL_DROPOUT_MASK"] = variant
            stored = attention_launch.stores_keep_mask(max(REGIONS, TOKENS), dtype, leaves[0].shape[-1], DROPOUT)
            timing = harness.time_fn(fn, args.device, grad_to_none=leaves)
            rows.append({"case": name, "variant": variant, "mask_stored": stored, "median_ms": timing.median_ms,
                         "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
                         "mask_bytes_written_and_read": 2 * mask_bytes if stored else 0})
            print(f"{name:18s} {variant:10s} stored={stored!s:5s} {timing.median_ms * 1e3:9.1f} us "
                  f"(mask traffic {rows[-1]['mask_bytes_written_and_read'] / 1e6:.2f} MB)")
    os.environ.pop("FASTVL_DROPOUT_MASK")
    out = Path(args.out) / f"dropout_mask_{harness.device_name(args.device).replace(' ', '_')}.json"
    out.write_text(json.dumps({"environment": harness.environment(args.device), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
