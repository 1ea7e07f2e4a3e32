"""specops.bench._plots: the PNGs a --report run writes, from the rows of a run (no timing here)."""
import pytest

from specops.bench import _plots as plots

pytest.importorskip("matplotlib")


def _rows():
    peers = [dict(family="peers", shape="attn 64", mode="in-network", method="lokr", impl=impl, ms=ms, **extra)
             for impl, ms, extra in (("frozen", 1.0, {}), ("specops", 1.2, {}), ("peft", 2.4, {}),
                                     ("lycoris", 3.6, {}), ("peft+specops", 1.2, {"x unpatched": 0.5}))]
    kron = [dict(family="kron", shape="M=64", provider=p, ms=ms, roof=roof, **{"x vs dense": 2.0 / ms})
            for p, ms, roof in (("dense", 2.0, 0.5), ("cpp", 0.5, 0.8))]
    return peers + kron


def test_report_plots_are_written(tmp_path):
    names = plots.write(_rows(), str(tmp_path), "test run")
    assert names == ["speedup-peers.png", "speedup-kron.png", "roof.png"]
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedups_are_read_from_the_rows():
    peers = [r for r in _rows() if r["family"] == "peers"]
    assert sorted(plots._peer_bars(peers)) == [("attn 64 in-network lokr", "peft+specops vs peft", 2.0),
                                               ("attn 64 in-network lokr", "specops vs lycoris", 3.0),
                                               ("attn 64 in-network lokr", "specops vs peft", 2.0)]
    kron = [r for r in _rows() if r["family"] == "kron"]
    assert plots._baseline_bars(kron) == [("M=64", "cpp vs dense", 4.0)]


def test_the_zip_family_does_not_shadow_zip_in_the_bench_package():
    """Importing specops.bench.zip binds the package attribute `zip` to that module: the timing loop
    must still pair providers with their times (it raised "'module' object is not callable")."""
    import specops.bench as bench
    import specops.bench.zip  # noqa: F401

    assert not callable(bench.zip)
    assert len(bench._interleaved([lambda: None, lambda: None], min_time=0.0)) == 2


def test_targets_are_judged_against_the_flop_and_byte_count_bound():
    """A speed-up target above what the counts allow is reported as such, with the fraction of the bound."""
    from specops.bench import verdict
    from specops.bench import zip as zip_bench

    assert verdict(2.6, 2.5, 3.0) == "met"
    assert verdict(2.2, 2.5, 3.0) == "MISSED"
    assert verdict(2.2, 2.5, 2.4) == "target above its bound: 92% of the bound"
    rows = [{"shape": "1280->1280 T=2048 layer", "provider": "specops", "ms": 30.0, "roof": 0.8},
            {"shape": "1280->1280 T=2048 layer", "provider": "public", "ms": 72.0, "roof": 0.3},
            {"shape": "1280->1280 T=2048 branch", "provider": "specops", "ms": 10.0, "roof": 0.8},
            {"shape": "1280->1280 T=2048 branch", "provider": "public", "ms": 48.0, "roof": 0.2},
            {"shape": "1280->1280 T=2048 base", "provider": "base", "ms": 20.0, "roof": 0.97}]
    text = zip_bench.summarize(rows)
    # layer: 72 / (20 + 0.8 * 10) = 2.57x bound; branch: 48 / 8 = 6x
    assert "2.40x, bound 2.57x (target 2.5x: MISSED)" in text
    assert "4.80x, bound 6.00x (target 3x: met)" in text
