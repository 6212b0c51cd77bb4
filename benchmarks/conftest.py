"""pytest-benchmark set-up for the CPU op benchmarks: ``pytest benchmarks/ --benchmark-only``
(``--bench-size tiny|small``, default small; ``--benchmark-json out.json`` saves pytest-benchmark's own
JSON). The main test run never collects this folder (``testpaths = ["tests"]``); GPU numbers come from
``fastvl bench`` (CUDA events), not from here."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("tiny", "small"), default="small",
                     help="shapes of the op benchmarks (fastvl.bench.ops.SIZES)")


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        from fastvl.bench import ops

        size = metafunc.config.getoption("--bench-size")
        params = [pytest.param((case, backend, kind), id=f"{case.name}-{_id(case.params)}-{backend}-{kind}")
                  for case in ops.cases(size) for backend in ops.backends_here(case.op, "cpu")
                  for kind in ops.PASSES]
        metafunc.parametrize("op_case", params)


def _id(params: dict) -> str:
    return ",".join(f"{k}{v}" for k, v in params.items())
