"""pytest-benchmark suite of one SDXL transformer-block training step (specops.bench.sdxl).

    pytest benchmarks/bench_sdxl.py --benchmark-group-by=param:case --benchmark-columns=median
The three providers (specops SODA-SVD, the SODA authors' formulation, rank-1 LoRA) of the
full-width block are grouped side by side; `python -m specops.bench sdxl --memory` prints the same
cases with the ratios, the FLOP bound of SODA / LoRA, peak memory and the issue's target.
"""
import pytest

from specops.bench import sdxl

CASES = sdxl.cases(quick=False)


@pytest.mark.skipif(not CASES, reason="needs diffusers (pip install 'specops[sdxl]')")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sdxl(benchmark, case):
    benchmark.group = case.shape
    benchmark.extra_info.update(provider=case.provider, flops=case.flops)
    benchmark(case.setup())
