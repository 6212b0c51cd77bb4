"""Op-level benchmarks through the public API of ``fastvl.ops``: every backend the op has on this
device, forward and forward+backward, at ViLBERT / ALBEF shapes.

Each case builds its inputs once per variant; each variant is one backend (plus ``auto``, the default
dispatch, whose row is the backend it dispatches to). The variants of one case and pass are timed
interleaved, their speed-ups over the reference paired per round (see :mod:`fastvl.bench.harness`).
Triton backends are skipped on CPU (the interpreter's time measures nothing about the kernel).

FLOPs and bytes are the useful work, stated per case:

* attention ``[B, Lq, H, D] x [B, Lk, H, D]``: forward ``4 B H Lq Lk D``, backward 2.5x that;
  bytes: q, k, v, out (and their gradients in the backward) once each.
* co_attention: two attentions, ``Lv x Lt`` and ``Lt x Lv``: forward ``8 B H Lv Lt D``, backward 2.5x.
* region_kl_loss ``[N, C]``: bytes of logits and targets read, gradient written (forward+backward in
  one pass is the floor); FLOPs negligible.
* linear_region_kl_loss / linear_cross_entropy ``hidden [N, K] -> [N, C]`` with M = masked (scored)
  rows: forward ``2 M K C``, forward+backward ``6 M K C`` (projecting only the scored rows).
* itc_loss ``B x E`` against ``B + Q`` entries: 4 similarity matmuls forward ``8 B E (B + Q)``, backward
  for the two with gradient ``4 B E (B + Q)``.
* layer_norm (residual form) / bias_gelu ``[N, H]``: bytes of the tensors read and written once each
  (listed with the cases); FLOPs negligible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

import fastvl.ops
from fastvl.bench import harness
from fastvl.dispatch import BackendUnavailableError, device_kind, listen, load_table, registered_ops, table_path

# Shapes per size: "tiny" for CI, "small" the CPU default, "paper" the GPU default (the papers' sizes).
SIZES = {
    "tiny": {"batch": 2, "text": 23, "regions": (10, 37), "text_heads": 2, "text_dim": 32, "vis_heads": 2,
             "vis_dim": 32, "patches": 33, "kl_hidden": 64, "classes": 1601, "mlm_hidden": 64, "vocab": 1000,
             "itc_batch": 4, "embed": 32, "queue": 64},
    "small": {"batch": 8, "text": 36, "regions": (10, 37, 101), "text_heads": 12, "text_dim": 64, "vis_heads": 8,
              "vis_dim": 128, "patches": 257, "kl_hidden": 1024, "classes": 1601, "mlm_hidden": 768,
              "vocab": 30522, "itc_batch": 16, "embed": 256, "queue": 4096},
    "paper": {"batch": 64, "text": 36, "regions": (10, 37, 101), "text_heads": 12, "text_dim": 64, "vis_heads": 8,
              "vis_dim": 128, "patches": 257, "kl_hidden": 1024, "classes": 1601, "mlm_hidden": 768,
              "vocab": 30522, "itc_batch": 64, "embed": 256, "queue": 65536},
}
MASKED_FRACTION = 0.15  # BERT/ViLBERT masking rate for MLM and masked-region modelling
PASSES = ("fwd", "fwd+bwd")
INTERRUPTED = "interrupted"
# What a user would write instead of a hand-made kernel: the reference under torch.compile (inductor).
COMPILED_REFERENCE = "compiled reference"


@dataclasses.dataclass
class Case:
    """One op at one shape. ``make(device, dtype, generator)`` -> (args, kwargs, tensors with grad);
    ``flops`` / ``nbytes`` give the work of one forward (``backward_factor`` x that for the backward)."""

    op: str
    name: str
    params: dict
    sweep: str  # the param plots put on the x axis
    make: Callable[[torch.device, torch.dtype, torch.Generator], tuple[tuple, dict, list[torch.Tensor]]]
    flops: float | None = None
    backward_flops_factor: float = 2.5
    nbytes: Callable[[int, str], float] | None = None  # (element size, pass) -> bytes moved

    def work(self, kind: str, element_size: int = 4) -> tuple[float | None, float | None]:
        """(FLOPs, bytes) of one call of pass ``kind`` ("fwd" or "fwd+bwd")."""
        flops = self.flops * (1.0 if kind == "fwd" else 1.0 + self.backward_flops_factor) if self.flops else None
        return flops, self.nbytes(element_size, kind) if self.nbytes is not None else None


def _randn(shape, device, dtype, generator, grad=True) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(grad)


def _prefix_mask(batch: int, length: int, generator: torch.Generator, device) -> torch.Tensor:
    """Random real lengths in [length // 2, length]: padding as the ragged batches have it."""
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=generator)
    return (torch.arange(length)[None] < lengths[:, None]).to(device)


def _masked_rows(rows: int, generator: torch.Generator, device) -> torch.Tensor:
    mask = torch.rand(rows, generator=generator) < MASKED_FRACTION
    mask[0] = True
    return mask.to(device)


def attention_case(name: str, batch: int, len_q: int, len_k: int, heads: int, head_dim: int, sweep: str) -> Case:
    def make(device, dtype, generator):
        q = _randn((batch, len_q, heads, head_dim), device, dtype, generator)
        k = _randn((batch, len_k, heads, head_dim), device, dtype, generator)
        v = _randn((batch, len_k, heads, head_dim), device, dtype, generator)
        mask = _prefix_mask(batch, len_k, generator, device)
        return (q, k, v), {"key_padding_mask": mask}, [q, k, v]

    elements = batch * heads * head_dim * (2 * len_q + 2 * len_k)  # q, out, k, v
    return Case("attention", name, {"B": batch, "Lq": len_q, "Lk": len_k, "H": heads, "D": head_dim}, sweep, make,
                flops=4 * batch * heads * len_q * len_k * head_dim,
                nbytes=lambda size, kind: (1 if kind == "fwd" else 2) * elements * size)


def co_attention_case(batch: int, regions: int, text: int, heads: int, head_dim: int) -> Case:
    def make(device, dtype, generator):
        streams = [_randn((batch, length, heads, head_dim), device, dtype, generator)
                   for length in (regions, regions, regions, text, text, text)]
        mask_v = _prefix_mask(batch, regions, generator, device)
        mask_t = _prefix_mask(batch, text, generator, device)
        q_v, k_v, v_v, q_t, k_t, v_t = streams
        return (q_v, k_v, v_v, mask_v, q_t, k_t, v_t, mask_t), {}, streams

    elements = batch * heads * head_dim * 4 * (regions + text)  # 3 projections + context per stream
    return Case("co_attention", "co_attention", {"B": batch, "Lv": regions, "Lt": text, "H": heads, "D": head_dim},
                "Lv", make, flops=8 * batch * heads * regions * text * head_dim,
                nbytes=lambda size, kind: (1 if kind == "fwd" else 2) * elements * size)


def region_kl_case(rows: int, classes: int, sweep_value: int) -> Case:
    def make(device, dtype, generator):
        logits = _randn((rows, classes), device, dtype, generator)
        targets = torch.softmax(torch.randn(rows, classes, generator=generator), -1).to(device=device, dtype=dtype)
        return (logits, targets, _masked_rows(rows, generator, device)), {}, [logits]

    return Case("region_kl_loss", "region_kl_loss", {"N": rows, "C": classes, "regions": sweep_value}, "regions", make,
                nbytes=lambda size, kind: (2 if kind == "fwd" else 3) * rows * classes * size)


def linear_head_case(op_name: str, rows: int, hidden: int, classes: int, sweep_value: int) -> Case:
    masked = max(1, round(rows * MASKED_FRACTION))

    def make(device, dtype, generator):
        h = _randn((rows, hidden), device, dtype, generator)
        weight = _randn((classes, hidden), device, dtype, generator)
        with torch.no_grad():
            weight.mul_(hidden**-0.5)
        bias = _randn((classes,), device, dtype, generator)
        scored = _masked_rows(rows, generator, device)
        if op_name == "linear_cross_entropy":
            labels = torch.randint(0, classes, (rows,), generator=generator).to(device)
            labels[~scored] = -1
            return (h, weight, bias, labels), {}, [h, weight, bias]
        targets = torch.softmax(torch.randn(rows, classes, generator=generator), -1).to(device=device, dtype=dtype)
        return (h, weight, bias, targets, scored), {}, [h, weight, bias]

    return Case(op_name, op_name, {"N": rows, "K": hidden, "C": classes, "tokens": sweep_value}, "tokens", make,
                flops=2 * masked * hidden * classes, backward_flops_factor=2.0)


def itc_case(batch: int, embed: int, queue: int) -> Case:
    def make(device, dtype, generator):
        def features(grad):
            x = torch.nn.functional.normalize(torch.randn(batch, embed, generator=generator), dim=-1)
            return x.to(device=device, dtype=dtype).requires_grad_(grad)

        def queue_of():
            x = torch.nn.functional.normalize(torch.randn(embed, queue, generator=generator), dim=0)
            return x.to(device=device, dtype=dtype)

        img, txt = features(True), features(True)
        return (img, txt, queue_of(), queue_of(), 0.07, 0.4, features(False), features(False)), {}, [img, txt]

    return Case("itc_loss", "itc_loss", {"B": batch, "E": embed, "Q": queue}, "Q", make,
                flops=8 * batch * embed * (batch + queue), backward_flops_factor=0.5)


def layer_norm_case(rows: int, hidden: int, sweep_value: int) -> Case:
    """BERT's residual + LayerNorm epilogue (dropout off): reads x, residual, writes the output; the
    backward reads the output gradient, x, residual and writes two input gradients."""

    def make(device, dtype, generator):
        x, residual = (_randn((rows, hidden), device, dtype, generator) for _ in range(2))
        weight, bias = _randn((hidden,), device, dtype, generator), _randn((hidden,), device, dtype, generator)
        return (x, weight, bias, residual), {}, [x, residual, weight, bias]

    return Case("layer_norm", "layer_norm residual", {"N": rows, "H": hidden, "tokens": sweep_value}, "tokens", make,
                nbytes=lambda size, kind: (3 if kind == "fwd" else 8) * rows * hidden * size)


def bias_gelu_case(rows: int, hidden: int, sweep_value: int) -> Case:
    """The feed-forward's bias + GELU: reads x, writes the output (backward: reads dy and x, writes dx)."""

    def make(device, dtype, generator):
        x, bias = _randn((rows, hidden), device, dtype, generator), _randn((hidden,), device, dtype, generator)
        return (x, bias), {}, [x, bias]

    return Case("bias_gelu", "bias_gelu", {"N": rows, "H": hidden, "tokens": sweep_value}, "tokens", make,
                nbytes=lambda size, kind: (2 if kind == "fwd" else 5) * rows * hidden * size)


def cases(size: str) -> list[Case]:
    s = SIZES[size]
    out = [attention_case("attention text self", s["batch"], s["text"], s["text"], s["text_heads"], s["text_dim"],
                          "Lk")]
    out += [attention_case("attention region self", s["batch"], r, r, s["vis_heads"], s["vis_dim"], "Lk")
            for r in s["regions"]]
    out.append(attention_case("attention albef cross", s["batch"], 30, s["patches"], s["text_heads"], s["text_dim"],
                              "Lk"))
    out += [co_attention_case(s["batch"], r, s["text"], s["vis_heads"], s["vis_dim"]) for r in s["regions"]]
    out += [region_kl_case(s["batch"] * r, s["classes"], r) for r in s["regions"]]
    out.append(linear_head_case("linear_region_kl_loss", s["batch"] * 37, s["kl_hidden"], s["classes"], 37))
    out.append(linear_head_case("linear_cross_entropy", s["batch"] * s["text"], s["mlm_hidden"], s["vocab"], s["text"]))
    out.append(itc_case(s["itc_batch"], s["embed"], s["queue"]))
    hidden, intermediate = s["text_heads"] * s["text_dim"], 4 * s["text_heads"] * s["text_dim"]
    out += [layer_norm_case(s["batch"] * length, hidden, length) for length in (s["text"], 160)]
    out += [bias_gelu_case(s["batch"] * length, intermediate, length) for length in (s["text"], 160)]
    return out


def backend_notes(op_name: str, device: torch.device | str) -> dict[str, list[str]]:
    """{backend: reasons it is not benchmarked here} for every backend of ``op_name``, plus ``auto``
    (empty = benchmarked). Triton is left out on CPU: the interpreter's time says nothing of the kernel."""
    device = torch.device(device)
    notes = {"auto": []}
    for name, backend in registered_ops()[op_name].backends.items():
        notes[name] = backend.available() or (["the Triton interpreter is not timed"]
                                               if name == "triton" and device.type == "cpu" else [])
    return notes


def backends_here(op_name: str, device: torch.device | str) -> list[str]:
    return [name for name, reasons in backend_notes(op_name, device).items() if not reasons]


def reason(error: BackendUnavailableError, backend: str) -> str:
    """The line of a dispatch error that explains ``backend``."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if line.startswith(f"{backend}:")), lines[0])


def _differentiable(output) -> list[torch.Tensor]:
    outputs = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
    return [t for t in outputs if t.requires_grad]


def prepare(case: Case, backend: str, kind: str, device: torch.device, dtype: torch.dtype,
            seed: int = 0) -> tuple[Callable[[], object], list[torch.Tensor]]:
    """(the callable to time, the tensors whose ``.grad`` it fills) for one case, backend and pass.
    Runs the op once, so a backend that cannot take these inputs raises BackendUnavailableError here."""
    args, kwargs, grad_inputs = case.make(device, dtype, torch.Generator().manual_seed(seed))
    function = getattr(fastvl.ops, case.op)
    if backend == COMPILED_REFERENCE:
        compiled = torch.compile(lambda *a, **k: function(*a, **k, backend="reference"), dynamic=False)

        def forward():
            return compiled(*args, **kwargs)
    else:
        def forward():
            return function(*args, **kwargs, backend=backend)

    outputs = _differentiable(forward())
    upstream = [torch.ones_like(t) if t.dim() == 0 else torch.randn_like(t) for t in outputs]

    def forward_backward():
        torch.autograd.backward(_differentiable(forward()), upstream)

    return (forward if kind == "fwd" else forward_backward), grad_inputs


def run(results: harness.Results, size: str, dtype: torch.dtype, *, only: Sequence[str] = (),
        passes: Sequence[str] = PASSES, compiled_reference: bool = False, budget: harness.Budget | None = None,
        memory: bool = True) -> tuple[list[str], list[str]]:
    """Measures every case (whose op is, or whose name starts with, one of ``only``, if given) with every
    backend, the backends of one case and pass interleaved (:meth:`harness.Results.compare`, speed-ups
    paired against the reference). ``auto`` is not timed apart from the backend it dispatches to: its row
    is that backend's (``same_as``). Returns (notes on the variants that cannot run these inputs,
    failures: variants that raised anything else, e.g. a kernel that does not compile; the run goes on
    without them)."""
    selected = [c for c in cases(size) if not only or any(word == c.op or c.name.startswith(word) for word in only)]
    notes, failures = [], []
    kind = device_kind(results.device)
    results.env["dispatch_table"] = {"path": str(table_path(kind)), "source": load_table(kind).get("source")}
    for op_name in dict.fromkeys(c.op for c in selected):
        notes += [f"{op_name}: {name} not benchmarked ({'; '.join(reasons)})"
                  for name, reasons in backend_notes(op_name, results.device).items() if reasons]
    extra = [COMPILED_REFERENCE] if compiled_reference else []
    work = [(case, kind) for case in selected for kind in passes]
    element = torch.empty((), dtype=dtype).element_size()
    try:
        for case, kind in harness.progress(work, f"ops ({size})"):
            fns, grads, chose = {}, {}, None
            for backend in backends_here(case.op, results.device) + extra:
                label = f"{case.name} {case.params} {kind} {backend}"
                try:
                    chosen = []  # the backend auto dispatched to
                    with listen(lambda event, impl: chosen.append(event.backend) if event.op == case.op else None):
                        fns[backend], grads[backend] = prepare(case, backend, kind, results.device, dtype)
                    if backend == "auto" and chosen:
                        chose = chosen[0]
                except BackendUnavailableError as error:
                    notes.append(f"{label}: skipped, {reason(error, backend)}")
                except Exception as error:  # one broken variant must not cost the other numbers
                    failures.append(f"{label}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            shared = chose in fns and chose != "auto"
            if shared:
                del fns["auto"], grads["auto"]
            if not fns:
                continue
            flops, nbytes = case.work(kind, element)
            meta = {"op": case.op, "sweep": case.sweep}
            try:
                rows = results.compare(fns, name=case.name, params={**case.params, "pass": kind}, baseline="reference",
                                       dtype=dtype, flops=flops, nbytes=nbytes, grad_to_none=grads, budget=budget,
                                       memory=memory,
                                       extra={v: {**meta, **({"chose": chose} if v == "auto" and chose else {})}
                                              for v in fns})
            except Exception as error:
                failures.append(f"{case.name} {case.params} {kind}: FAILED {type(error).__name__}: "
                                f"{str(error).splitlines()[0][:200]}")
                continue
            if shared:
                results.same_as(next(r for r in rows if r["variant"] == chose), "auto", chose=chose)
    except KeyboardInterrupt:  # a time limit (the GPU suite's timeout sends SIGINT): keep what was measured
        failures.append(f"{INTERRUPTED} after {len(results.rows)} rows of {len(work)} case/pass groups")
    notes += [f"auto slower: {line}" for line in auto_regressions(results.rows)]
    return notes, failures


def clearly_faster(row: dict, than: dict) -> bool:
    """Whether ``row`` is faster than ``than`` beyond noise: the paired speed-up's verdict where both were
    timed in one interleaved comparison, else ``row``'s 80th-percentile time below ``than``'s 20th."""
    paired = harness.speedup(row, than)
    if paired["method"] == "paired rounds":
        return paired["verdict"] == "faster"
    return paired["method"] != "same code path" and row["p80_ms"] < than["p20_ms"]


def auto_regressions(rows: Sequence[dict]) -> list[str]:
    """Where ``auto`` dispatched to a backend that is slower beyond noise than another one measured on the
    same case and pass: the paired speed-up of the other over the chosen one has a confidence interval
    above 1 (rows timed in one interleaved comparison), or, for rows without per-round times, the chosen
    backend's 20th-percentile time above the other's 80th percentile. ``auto`` rows must carry ``chose``."""
    found = []
    for row in rows:
        if row["variant"] != "auto" or "chose" not in row:
            continue
        peers = {r["variant"]: r for r in rows if r["name"] == row["name"] and r["params"] == row["params"]
                 and r["variant"] not in ("auto", COMPILED_REFERENCE)}
        chosen = peers.get(row["chose"])
        if chosen is None:
            continue
        for name, other in peers.items():
            if name != row["chose"] and clearly_faster(other, chosen):
                found.append(f"{row['name']} {row['params']}: auto picks {row['chose']} "
                             f"({chosen['median_ms']:.3f} ms), {name} takes {other['median_ms']:.3f} ms")
    return found


def plot_speedups(results: harness.Results, out_dir, baseline: str = "reference") -> list:
    """One PNG per benchmark family with a sweep: speed-up over ``baseline`` against the swept param (the
    paired median; ``auto`` drawn only where it was timed apart from the backends)."""
    paths = []
    shared = {(r["name"], str(r["params"])) for r in results.rows if r["variant"] == "auto" and r.get("same_as")}
    # auto's line where it shares a backend's timing would be that backend's line again
    ratio_rows = [r for r in results.ratios(baseline) if r["variant"] != "auto" or (r["name"], str(r["params"]))
                  not in shared]
    sweeps = {row["name"]: row["sweep"] for row in results.rows}
    for name, sweep in sweeps.items():
        family = [r for r in ratio_rows if r["name"] == name]
        if len({r["params"][sweep] for r in family}) < 2:
            continue
        for r in family:
            r["series"] = f"{r['variant']} {r['params']['pass']}"
        slug = name.replace(" ", "-").replace("+", "")
        paths.append(harness.plot(family, f"{out_dir}/ops-{slug}.png", x=sweep, y="speedup", series="series",
                                  title=f"{name}: speed-up over {baseline}", env=results.env))
    return [path for path in paths if path is not None]
