"""pytest-benchmark view of the ZipLoRA cases: `pytest benchmarks/bench_zip.py --benchmark-group-by=group`.

The cases (SDXL attention layers with two rank-64 LoRAs, one merger-training step; the penalty
over the 560 SDXL attention layers; providers specops vs the public dense-ΔW formulation) are
those of `python -m specops.bench zip`, whose summary prints the ratios against the targets.
"""
import pytest

from specops.bench import zip as zip_bench

CASES = zip_bench.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_zip(benchmark, case):
    fn = case.setup()
    benchmark.group = case.shape
    benchmark.extra_info.update(provider=case.provider, flops=case.flops, bytes=case.bytes)
    benchmark(fn)
