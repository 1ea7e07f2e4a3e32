"""pytest-benchmark view of the kron cases: `pytest benchmarks/bench_kron.py --benchmark-group-by=param:case`.

The cases (shapes, providers, FLOP and byte counts) are those of `python -m specops.bench kron`.
"""
import pytest

from specops.bench import kron

CASES = kron.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kron(benchmark, case):
    fn = case.setup()
    benchmark.group = case.shape
    benchmark.extra_info.update(provider=case.provider, flops=case.flops, bytes=case.bytes)
    benchmark(fn)
