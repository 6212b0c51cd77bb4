"""Interleaved host-time rounds of itc_loss at the host probe (B=4, E=32, Q=64): fused (Triton launches
stubbed) and reference, fwd and fwd+bwd, each round timing every variant with fastvl.bench.host.host_us
(0.3 s budget, 10th percentile).

Run from a checkout: ``PYTHONPATH=. OMP_NUM_THREADS=1 python .../measure.py ROUNDS OUT.json``
(``--tensor-temp``: forward + backward with temp a tensor that requires grad, ALBEF's case).
"""

import contextlib
import json
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fastvl  # noqa: E402
from fastvl.bench import host, ops  # noqa: E402


def variants(tensor_temp: bool):
    case = next(c for c in ops.cases("tiny") if c.op == "itc_loss")
    found = {}
    for backend in ("triton", "reference"):
        stub = host.stubbed_triton if backend == "triton" else (lambda counter=None: contextlib.nullcontext())
        if tensor_temp:
            args, _, _ = case.make(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
            args = list(args)
            args[4] = torch.tensor(0.07, requires_grad=True)

            def forward_backward(args=args, backend=backend):
                fastvl.ops.itc_loss(*args, backend=backend).backward()

            found[backend] = (forward_backward, stub)
            continue
        for kind in ops.PASSES:
            with stub():
                fn, _ = ops.prepare(case, backend, kind, torch.device("cpu"), torch.float32)
            found[f"{backend} {kind}"] = (fn, stub)
    return case, found


def main() -> None:
    tensor_temp = "--tensor-temp" in sys.argv
    rounds, out = (a for a in sys.argv[1:] if a != "--tensor-temp")
    torch.set_num_threads(1)
    case, found = variants(tensor_temp)
    launches = {}
    for name, (fn, stub) in found.items():
        counter = host.LaunchCounter()
        with stub(counter), counter:
            fn()
        launches[name] = counter.total
    times = {}
    for _ in range(int(rounds)):
        for name, (fn, stub) in found.items():
            with stub():
                micros, _ = host.host_us(fn, 0.3)
            times.setdefault(name, []).append(round(micros, 1))
    root = os.path.dirname(os.path.dirname(fastvl.__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    document = {"measure": __doc__.split("\n\n")[0], "tensor_temp": tensor_temp, "params": case.params,
                "commit": commit.stdout.strip(), "launches": launches, "host_us_p10_per_round": times,
                "best_round": {name: min(values) for name, values in times.items()}}
    with open(out, "w") as file:
        json.dump(document, file, indent=1)
    print(json.dumps(document["best_round"]), launches)


if __name__ == "__main__":
    main()
