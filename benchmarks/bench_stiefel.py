"""pytest-benchmark suite for the fused Stiefel optimisers (SDXL SODA, 1,680 factors, one step).

    pytest benchmarks/bench_stiefel.py --benchmark-group-by=param:case_shape
Same cases as `python -m specops.bench stiefel` (specops/bench/stiefel.py), which also prints the
ratios against the per-parameter loop and geotorch.
"""
import pytest

from specops.bench import stiefel

CASES = stiefel.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_stiefel_step(benchmark, case):
    benchmark.group = case.shape
    fn = case.setup()
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
