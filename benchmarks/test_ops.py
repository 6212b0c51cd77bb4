"""CPU op benchmarks under pytest-benchmark: the cases of :mod:`fastvl.bench.ops` (the same shapes,
FLOP and byte counts as ``fastvl bench ops``), one benchmark per case x backend x pass, grouped so
each group compares the backends of one shape."""

import pytest
import torch

from fastvl.bench import ops
from fastvl.dispatch import BackendUnavailableError


def test_op(benchmark, op_case):
    case, backend, kind = op_case
    try:
        fn, grad_inputs = ops.prepare(case, backend, kind, torch.device("cpu"), torch.float32)
    except BackendUnavailableError as error:
        pytest.skip(ops.reason(error, backend))
    benchmark.group = f"{case.name} {case.params} {kind}"
    benchmark.extra_info.update(case.params, op=case.op, backend=backend, flops=case.work(kind)[0])

    def setup():
        for tensor in grad_inputs:
            tensor.grad = None

    benchmark.pedantic(fn, setup=setup, rounds=10, warmup_rounds=1)
