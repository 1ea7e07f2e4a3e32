"""pytest-benchmark suite of the spectral family (the cases of specops.bench.spectral).

    pytest benchmarks/bench_spectral.py --benchmark-group-by=param:case --benchmark-columns=median
Providers of one shape are grouped side by side; `python -m specops.bench spectral --memory` prints
the same cases with the ratios, peak memory and the issue's targets.
"""
import pytest

from specops.bench import spectral

CASES = spectral.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_spectral(benchmark, case):
    benchmark.group = case.shape
    benchmark.extra_info.update(provider=case.provider, flops=case.flops)
    benchmark(case.setup())
