"""Benchmarks and parity tools: the shared harness (:mod:`fastvl.bench.harness`), ``fastvl bench``
(:mod:`fastvl.bench.cli`) and ``fastvl parity`` (:mod:`fastvl.bench.parity`)."""
