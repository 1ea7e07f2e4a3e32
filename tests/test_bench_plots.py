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
