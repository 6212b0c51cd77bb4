"""Attention and co-attention benchmark: fastvl's fused Triton kernels against the eager reference,
torch SDPA (through fastvl's mask handling, and each SDPA backend directly), xformers and flash_attn
where installed, at the shapes of ViLBERT, VL-BERT and ALBEF, ragged packed batches, and a long-sequence
sweep.

    python benchmarks/bench_attention.py              # GPU: bf16 at the papers' shapes (one command)
    python benchmarks/bench_attention.py --quick      # shorter timing budget
    python benchmarks/bench_attention.py --device cpu # CPU: SDPA vs eager at small shapes, fp32

Work per call, stated with every number:
    attention [B, Lq, H, D] x [B, Lk, H, D]: forward FLOPs 4 B H Lq Lk D (two matmuls), backward 2.5x
    that (five matmuls, one recomputed), so forward+backward 3.5x. Bytes: q, k, v read and the output
    written once (forward); plus dO read and dq, dk, dv written (backward) -- the floor of an O(L)-memory
    kernel. Co-attention is two attentions (Lv x Lt and Lt x Lv): 8 B H Lv Lt D forward.
Writes ``attention_<device>.json`` and PNG plots under ``benchmarks/results/`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

import fastvl
from fastvl.bench import harness
from fastvl.dispatch import BackendUnavailableError

RESULTS = Path(__file__).resolve().parent / "results"
BACKWARD_FACTOR = 2.5


def flops(batch, heads, len_q, len_k, head_dim, kind, directions=1):
    forward = 4.0 * batch * heads * len_q * len_k * head_dim * directions
    return forward * (1.0 if kind == "fwd" else 1.0 + BACKWARD_FACTOR)


def nbytes(batch, heads, rows, head_dim, element, kind):
    """``rows`` = query rows + key rows over all directions' tensors (see the module docstring)."""
    per_row = batch * heads * head_dim * element
    return per_row * rows * (1 if kind == "fwd" else 3)  # forward: q,k,v,o; + backward: dO,o,q,k,v,dq,dk,dv


def sdpa_backends():
    """(variant name, context manager factory) for each SDPA backend of this torch, GPU only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
              "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
    return {name: (lambda backend=backend: sdpa_kernel(backend)) for name, backend in chosen.items()}


def _randn(generator, shape, device, dtype):
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()


def _lengths(generator, count, low, high):
    return torch.randint(low, high + 1, (count,), generator=generator)


def _mask(lengths, length, device):
    return (torch.arange(length)[None] < lengths[:, None]).to(device)


def _cu(lengths, device):
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)


def _pack(padded, lengths):
    return torch.cat([padded[i, :n] for i, n in enumerate(lengths.tolist())]).detach().requires_grad_()


@contextlib.contextmanager
def _tiled_path():
    """The Triton backend on its tiled kernels at every length (the launchers' override)."""
    saved = os.environ.get("FASTVL_ATTENTION_PATH")
    os.environ["FASTVL_ATTENTION_PATH"] = "tiled"
    try:
        yield
    finally:
        os.environ.pop("FASTVL_ATTENTION_PATH")
        if saved is not None:
            os.environ["FASTVL_ATTENTION_PATH"] = saved


class Bench:
    def __init__(self, device, dtype, quick, out):
        self.device, self.dtype, self.out = torch.device(device), dtype, Path(out)
        self.results = harness.Results("attention", self.device, quick=quick)
        self.generator = torch.Generator().manual_seed(0)
        self.peak = harness.device_peak(self.device, dtype)
        self.gpu = self.device.type == "cuda"

    def variants(self, op_name, extra_sdpa=True):
        """Variant name -> (backend name, context factory). Triton only on GPU (the interpreter's
        time says nothing about the kernel); SDPA's own backends only on GPU."""
        chosen = {"reference": ("reference", contextlib.nullcontext), "sdpa": ("sdpa", contextlib.nullcontext)}
        if self.gpu:
            chosen["triton"] = ("triton", contextlib.nullcontext)
            chosen["triton-tiled"] = ("triton", _tiled_path)  # the tiled kernels at every length
            if extra_sdpa:
                chosen.update({name: ("sdpa", factory) for name, factory in sdpa_backends().items()})
            for optional in ("xformers", "flash_attn"):
                if op_name == "attention" and importlib.util.find_spec(optional) is not None:
                    chosen[optional] = (optional, contextlib.nullcontext)
        return chosen

    def measure(self, name, params, variant, run, inputs, kind, work_flops, work_bytes):
        """Times ``run()`` (forward) or forward+backward; skips variants that cannot run these inputs."""
        grads = None

        def forward():
            with torch.no_grad():
                return run()

        def forward_backward():
            nonlocal grads
            outputs = run()
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
            if grads is None:
                grads = [torch.randn_like(o) for o in outputs]
            torch.autograd.backward(outputs, grads)

        fn = forward if kind == "fwd" else forward_backward
        try:
            fn()
        except (BackendUnavailableError, RuntimeError) as error:  # e.g. an SDPA backend that takes no mask
            print(f"  skip {name} {variant} {kind}: {str(error).splitlines()[0][:150]}", file=sys.stderr)
            return None
        except Exception as error:  # e.g. a kernel that does not compile: the others still run
            self.failed(name, params, variant, kind, error)
            return None
        try:
            return self.results.measure(fn, name=f"{name} {kind}", variant=variant, params=params, dtype=self.dtype,
                                        flops=work_flops, nbytes=work_bytes, grad_to_none=inputs)
        except Exception as error:  # e.g. out of memory while timing
            self.failed(name, params, variant, kind, error)
            return None

    def failed(self, name, params, variant, kind, error):
        message = f"{name} {params} {variant} {kind}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        self.results.failures.append(message)
        print(f"  {message}", file=sys.stderr)

    def floors(self, label, work_flops, work_bytes):
        print(f"{label}: {work_flops / 1e9:.3g} GFLOP, {work_bytes / 1e6:.3g} MB; "
              + harness.describe_floors(work_flops, work_bytes, self.peak))

    # Cases -------------------------------------------------------------------------------------------

    def co_attention(self, batch, regions, text, heads, head_dim, ragged=False):
        """ViLBERT's co-attention at a padded batch (random real lengths); ``ragged``: lengths uniform in
        10..regions / 8..text, run padded and packed."""
        g, dev, dt = self.generator, self.device, self.dtype
        lengths_v = _lengths(g, batch, 10 if ragged else max(1, regions // 2), regions)
        lengths_t = _lengths(g, batch, 8 if ragged else max(1, text // 2), text)
        padded = [_randn(g, (batch, n, heads, head_dim), dev, dt) for n in (regions,) * 3 + (text,) * 3]
        mask_v, mask_t = _mask(lengths_v, regions, dev), _mask(lengths_t, text, dev)
        name = "co_attention ragged" if ragged else "co_attention"
        params = {"B": batch, "Lv": regions, "Lt": text, "H": heads, "D": head_dim}
        element = torch.finfo(dt).bits // 8
        for kind in ("fwd", "fwd+bwd"):
            work_f = flops(batch, heads, regions, text, head_dim, kind, directions=2)
            work_b = nbytes(batch, heads, 4 * (regions + text), head_dim, element, kind)
            self.floors(f"{name} {params} {kind}", work_f, work_b)
            for variant, (backend, context) in self.variants("co_attention").items():
                def run(backend=backend, context=context):
                    with context():
                        return fastvl.ops.co_attention(*padded[:3], mask_v, *padded[3:], mask_t, backend=backend)
                self.measure(name, params, variant, run, padded, kind, work_f, work_b)
            if ragged and self.gpu:
                packed = [_pack(t, n) for t, n in zip(padded, [lengths_v] * 3 + [lengths_t] * 3)]
                cu_v, cu_t = _cu(lengths_v, dev), _cu(lengths_t, dev)
                max_v, max_t = int(lengths_v.max()), int(lengths_t.max())

                def run_packed():
                    return fastvl.ops.co_attention(*packed[:3], None, *packed[3:], None, cu_seqlens_v=cu_v,
                                                   cu_seqlens_t=cu_t, max_seqlen_v=max_v, max_seqlen_t=max_t,
                                                   backend="triton")
                self.measure(name, params, "triton-packed", run_packed, packed, kind, work_f, work_b)

    def attention(self, name, batch, len_q, len_k, heads, head_dim, mask=True, sweep=False):
        g, dev, dt = self.generator, self.device, self.dtype
        q = _randn(g, (batch, len_q, heads, head_dim), dev, dt)
        k, v = (_randn(g, (batch, len_k, heads, head_dim), dev, dt) for _ in range(2))
        key_mask = _mask(_lengths(g, batch, max(1, len_k // 2), len_k), len_k, dev) if mask else None
        params = {"B": batch, "Lq": len_q, "Lk": len_k, "H": heads, "D": head_dim}
        element = torch.finfo(dt).bits // 8
        for kind in ("fwd", "fwd+bwd"):
            work_f = flops(batch, heads, len_q, len_k, head_dim, kind)
            work_b = nbytes(batch, heads, 2 * (len_q + len_k), head_dim, element, kind)
            self.floors(f"{name} {params} {kind}", work_f, work_b)
            for variant, (backend, context) in self.variants("attention").items():
                if sweep and variant in ("reference", "sdpa-math") and len_q > 2048:
                    continue  # Lq x Lk probabilities: minutes and gigabytes, nothing to learn
                def run(backend=backend, context=context):
                    with context():
                        return fastvl.ops.attention(q, k, v, key_mask, backend=backend)
                self.measure(name, params, variant, run, [q, k, v], kind, work_f, work_b)

    # Output --------------------------------------------------------------------------------------------

    def save(self):
        slug = "cpu" if not self.gpu else harness.results_dir(self.device).name.split("-", 3)[-1]
        path = self.results.save(self.out / f"attention_{slug}.json", baselines=("reference", "sdpa"))
        print(self.results.table(baselines=("reference", "sdpa")))
        plots = [("co_attention fwd+bwd", "Lv", lambda r: r["params"]["Lt"] == 36, "co_attention fwd+bwd, Lt=36")]
        plots += [(f"attention sweep d{d} fwd+bwd", "Lq", None, f"attention fwd+bwd, D={d} sweep") for d in (64, 128)]
        for name, x, keep, title in plots:
            selected = [r for r in self.results.rows if r["name"] == name and (keep is None or keep(r))]
            if selected:
                harness.plot(selected, self.out / f"attention_{slug}_{name.replace(' ', '_')}.png", x=x,
                             title=f"{title}, {str(self.dtype)[6:]}", env=self.results.env, logy=True)
        for failure in self.results.failures:
            print(f"failed: {failure}", file=sys.stderr)
        print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=str(harness.default_device()))
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="shorter timing budget")
    parser.add_argument("--vilbert", action="store_true",
                        help="only ViLBERT-base's shapes (the GPU suite's first look)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    bench = Bench(device, dtype, args.quick, args.out)
    try:
        run_cases(bench, device, args.vilbert)
    except KeyboardInterrupt:  # a time limit (the GPU suite's timeout sends SIGINT): save what was measured
        bench.results.failures.append(f"interrupted after {len(bench.results.rows)} measurements")
        print(f"interrupted: saving the {len(bench.results.rows)} measurements made", file=sys.stderr)
    bench.save()
    return 1 if bench.results.failures else 0


def run_cases(bench: Bench, device: torch.device, vilbert_only: bool = False) -> None:
    if device.type == "cuda" and vilbert_only:
        bench.co_attention(64, 37, 36, 8, 128)
        bench.attention("attention vilbert text", 64, 36, 36, 12, 64)
        bench.attention("attention vilbert visual", 64, 37, 37, 8, 128)
    elif device.type == "cuda":
        for regions in (37, 101):
            for text in (36, 80):
                bench.co_attention(64, regions, text, 8, 128)
        bench.co_attention(64, 36, 36, 8, 128, ragged=True)
        bench.attention("attention vilbert text", 64, 36, 36, 12, 64)
        for regions in (37, 101):
            bench.attention("attention vilbert visual", 64, regions, regions, 8, 128)
        bench.attention("attention vlbert", 64, 160, 160, 12, 64)
        bench.attention("attention albef cross", 64, 30, 257, 12, 64, mask=False)
        for head_dim in (64, 128):
            for length in (512, 1024, 2048, 4096, 8192):
                bench.attention(f"attention sweep d{head_dim}", max(1, 16384 // length), length, length,
                                2048 // head_dim, head_dim, mask=False, sweep=True)
    else:  # CPU: every machine gets a number (SDPA vs eager), at sizes a CPU finishes quickly
        for regions in (37, 101):
            bench.co_attention(8, regions, 36, 8, 128)
        bench.attention("attention vilbert text", 8, 36, 36, 12, 64)
        bench.attention("attention albef cross", 8, 30, 257, 12, 64, mask=False)


if __name__ == "__main__":
    sys.exit(main())
