"""specops.integrations.lycoris: apply() runs a LyCORIS network's LoCon / LoKr / LoHa / diag-OFT modules through specops
with LyCORIS's outputs and gradients, state and files unchanged; revert() gives LyCORIS's forward back.
LyCORIS keeps its configuration in class attributes, which every test here restores."""
import copy
import io
import warnings

import pytest
import torch
from helpers import GeomNet, TwoLayerNet, WideConvNet, factored_calls, loha_path, saved_for_backward
from torch import nn

lycoris = pytest.importorskip("lycoris")

from lycoris import LycorisNetwork, create_lycoris  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

from specops.integrations import lycoris as sl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "lycoris_state")  # small ops: see conftest.one_thread


CASES = {  # id: create_lycoris keyword arguments; dim 2 < half the factor sizes factors LoKr's W2
    "lokr": dict(algo="lokr"),
    "lokr-factored-tucker": dict(algo="lokr", decompose_both=True, use_tucker=True),
    "lokr-dense-scalar": dict(algo="lokr", linear_dim=64, conv_dim=64, use_scalar=True),
    "lokr-bypass-rslora": dict(algo="lokr", bypass_mode=True, rs_lora=True),
    "loha": dict(algo="loha"),
    "loha-tucker-scalar": dict(algo="loha", use_tucker=True, use_scalar=True),
    "loha-bypass": dict(algo="loha", bypass_mode=True),
    "lokr-dora": dict(algo="lokr", dora_wd=True),
    "loha-dora-tucker-in": dict(algo="loha", dora_wd=True, wd_on_output=False, use_tucker=True),
    "oft": dict(algo="diag-oft", linear_dim=4, conv_dim=4),
    "oft-rescaled-constraint": dict(algo="diag-oft", linear_dim=4, conv_dim=4, rescaled=True, constraint=0.01),
    "locon": dict(algo="lora"),
    "locon-tucker-scalar": dict(algo="lora", use_tucker=True, use_scalar=True),
    "locon-bypass": dict(algo="lora", bypass_mode=True),
}
NAMES = ["lycoris_lin", "lycoris_conv"]


def _network(case="lokr", net_cls=TwoLayerNet, multiplier=0.7, seed=0, **extra):
    """The net and its applied LyCORIS network, every factor perturbed off LyCORIS's zero init."""
    torch.manual_seed(seed)
    net = net_cls()
    kw = {**CASES[case], **extra}
    dim, conv_dim = kw.pop("linear_dim", 2), kw.pop("conv_dim", 2)
    network = create_lycoris(net, multiplier, dim, 3.0, conv_dim=conv_dim, conv_alpha=1.5,
                             warn_on_unmatched=False, **kw)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net, network


def _inputs(net_cls=TwoLayerNet, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    shapes = {TwoLayerNet: [(2, 5, 24), (2, 6, 7, 7)], GeomNet: [(3, 21), (2, 6, 9, 9)],
              WideConvNet: [(2, 5, 24), (2, 32, 9, 9)]}[net_cls]
    return [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def _step(net, network, x, z):
    """Outputs and the gradients of a fixed random projection of them w.r.t. x, z, the base weights
    and every adapter parameter."""
    outs = net(x, z)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    named = [(f"base.{n}", p) for n, p in net.named_parameters()] + list(network.named_parameters())
    names, params = zip(*[(n, p) for n, p in named if p.requires_grad])
    grads = torch.autograd.grad(loss, [x, z, *params], materialize_grads=True)  # dropped modules: zeros
    return dict(zip(["y_lin", "y_conv", "grad_x", "grad_z", *names], [*outs, *grads]))


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6 * want[k].abs().max().item(), msg=k)


def _lycoris_forward_forbidden(monkeypatch):
    """Make LyCORIS's own LoCon / LoKr / LoHa / diag-OFT forward raise: the patched path must not fall back."""
    def forbidden(*args, **kwargs):
        raise AssertionError("LyCORIS's forward ran")

    for cls in (LoConModule, LokrModule, LohaModule, DiagOFTModule):
        monkeypatch.setattr(cls, "forward", forbidden)


@pytest.mark.parametrize("case", list(CASES))
def test_apply_matches_lycoris(case, monkeypatch):
    net, network = _network(case)
    x, z = _inputs()
    want = _step(net, network, x, z)
    assert {k for k in want if k.startswith("lycoris_")} == {n for n, _ in network.named_parameters()}
    report = sl.apply(network)
    assert report == {"patched": NAMES, "skipped": {}, "notes": {}}
    with monkeypatch.context() as mp:
        _lycoris_forward_forbidden(mp)
        got = _step(net, network, x, z)
    _assert_close(got, want)


class UngroupedGeomNet(GeomNet):
    """GeomNet's strided, dilated conv without groups (a grouped conv's LoCon stays on LyCORIS's path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2)


@pytest.mark.parametrize("case", ["lokr", "loha-bypass", "lokr-dora", "oft", "locon"])
def test_apply_matches_lycoris_on_odd_geometry(case, monkeypatch):
    net_cls = UngroupedGeomNet if case.startswith("locon") else GeomNet
    net, network = _network(case, net_cls)
    x, z = _inputs(GeomNet)
    want = _step(net, network, x, z)
    assert sl.apply(network)["patched"] == NAMES
    _lycoris_forward_forbidden(monkeypatch)
    _assert_close(_step(net, network, x, z), want)


@pytest.mark.parametrize("case", ["loha", "loha-bypass"])
@pytest.mark.parametrize("factored", [True, False])
def test_loha_factored_and_merged_match_lycoris(case, factored, monkeypatch):
    """LoHa's rank-r² path (C D, no ΔW) and its merged W0 + ΔW path, each forced on the Linear and the conv:
    LyCORIS's values and gradients."""
    net, network = _network(case, use_scalar=True)
    x, z = _inputs()
    want = _step(net, network, x, z)
    sl.apply(network)
    _lycoris_forward_forbidden(monkeypatch)
    with loha_path(monkeypatch, factored) as calls:
        got = _step(net, network, x, z)
    assert len(calls) == 2
    _assert_close(got, want)


@pytest.mark.parametrize("case", ["lokr", "lokr-factored-tucker", "lokr-dense-scalar"])
def test_factored_lokr_conv_matches_lycoris(case, monkeypatch):
    """A conv wide enough for the factored LoKr path (ΔW never formed): LyCORIS's values and gradients."""
    net, network = _network(case, WideConvNet)
    x, z = _inputs(WideConvNet)
    want = _step(net, network, x, z)
    sl.apply(network)
    _lycoris_forward_forbidden(monkeypatch)
    with factored_calls(monkeypatch, sl) as calls:
        got = _step(net, network, x, z)
    assert calls == [True]
    _assert_close(got, want)


def test_multiplier_is_read_at_every_call():
    x, z = _inputs()
    net, network = _network("loha")
    ref, ref_network = _network("loha")
    sl.apply(network)
    for nw in (network, ref_network):
        nw.set_multiplier(-1.3)
    _assert_close(_step(net, network, x, z), _step(ref, ref_network, x, z))


@pytest.mark.parametrize("case", ["lokr-factored-tucker", "loha-tucker-scalar", "loha-dora-tucker-in",
                                  "oft-rescaled-constraint", "locon-tucker-scalar"])
def test_patched_gradcheck_float64(case, monkeypatch):
    """Fast-mode gradcheck of the patched modules w.r.t. the input and every adapter parameter."""
    net, network = _network(case)
    net.double(), network.double()
    sl.apply(network)
    _lycoris_forward_forbidden(monkeypatch)
    x, z = _inputs(dtype=torch.float64)
    x, z = x.detach()[:1, :2].requires_grad_(), z.detach()[:1, :, :4, :4].requires_grad_()
    for name, layer, inp in (("lycoris_lin", net.lin, x), ("lycoris_conv", net.conv, z)):
        mod = getattr(network, name)
        keys = [k for k, p in mod.named_parameters() if p.requires_grad]
        leaves = [mod.get_parameter(k).detach().clone().requires_grad_() for k in keys]
        f = lambda i, *ps: _call_with(layer, mod, keys, i, ps)  # noqa: E731
        assert torch.autograd.gradcheck(f, (inp, *leaves), fast_mode=True)


def _call_with(layer, mod, keys, inp, values):
    """layer(inp) with mod's parameters (dotted names: LoCon's sit in submodules) temporarily swapped
    for `values` (differentiable tensors)."""
    owners = [(mod.get_submodule(k.rpartition(".")[0]), k.rpartition(".")[2]) for k in keys]
    saved = [o._parameters[n] for o, n in owners]
    for (o, n), v in zip(owners, values):
        o._parameters[n] = v
    try:
        return layer(inp)
    finally:
        for (o, n), p in zip(owners, saved):
            o._parameters[n] = p


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_and_saved_files_unchanged(tmp_path, suffix):
    _, network = _network("lokr-dense-scalar")
    before = network.state_dict()
    network.save_weights(str(tmp_path / f"lycoris{suffix}"), torch.float16, {"k": "v"} if suffix[1] == "s" else None)
    sl.apply(network)
    after = network.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    network.save_weights(str(tmp_path / f"patched{suffix}"), torch.float16, {"k": "v"} if suffix[1] == "s" else None)
    if suffix == ".safetensors":
        assert (tmp_path / "lycoris.safetensors").read_bytes() == (tmp_path / "patched.safetensors").read_bytes()
    else:  # torch.save writes a zip whose entry names carry the file name: compare the tensors
        a, b = (torch.load(tmp_path / f"{n}.pt") for n in ("lycoris", "patched"))
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_revert_restores_lycoris_forward_and_apply_again():
    x, z = _inputs()
    net, network = _network("lokr")
    mod = network.lycoris_lin
    with torch.no_grad():
        want = net(x, z)
    assert sl.apply(network) == sl.apply(network)  # idempotent
    assert "forward" in mod.__dict__ and net.lin.forward is mod.forward
    assert sl.revert(network) == NAMES
    assert "forward" not in mod.__dict__
    for layer, m in ((net.lin, mod), (net.conv, network.lycoris_conv)):  # as apply_to() left it
        assert layer.forward.__self__ is m and layer.forward.__func__ is type(m).forward
    with torch.no_grad():
        for a, b in zip(net(x, z), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sl.revert(network) == []
    assert sl.apply(network)["patched"] == NAMES
    network.restore()  # LyCORIS's own removal still gives the plain layers back
    assert "forward" not in net.lin.__dict__ or net.lin.forward.__func__ is nn.Linear.forward


def test_deepcopy_and_torch_save_keep_the_patch():
    x, z = _inputs()
    net, network = _network("loha")
    sl.apply(network)
    both = nn.ModuleDict({"net": net, "network": network})
    buf = io.BytesIO()
    torch.save(both, buf)
    buf.seek(0)
    with torch.no_grad():
        want = net(x, z)
        for other in (copy.deepcopy(both), torch.load(buf, weights_only=False)):
            mod = other["network"].lycoris_lin
            assert mod.forward.module is mod and other["net"].lin.forward is mod.forward  # bound to the copy
            for a, b in zip(other["net"](x, z), want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_modules_run_lycoris_in_training_and_are_noted():
    x, z = _inputs()
    kw = dict(module_dropout=0.5, rank_dropout=0.25)
    net, network = _network("lokr", **kw)
    ref, ref_network = _network("lokr", **kw)
    report = sl.apply(network)
    assert report["patched"] == NAMES and set(report["notes"]) == set(NAMES)
    assert "dropout" in report["notes"]["lycoris_lin"]
    for seed in range(3):  # the same random masks as LyCORIS's
        torch.manual_seed(seed)
        want = _step(ref, ref_network, x, z)
        torch.manual_seed(seed)
        _assert_close(_step(net, network, x, z), want)
    network.eval(), ref_network.eval()
    _assert_close(_step(net, network, x, z), _step(ref, ref_network, x, z))


@pytest.mark.parametrize("case, why", [
    (dict(algo="lora", dora_wd=True), "dora_wd on LoConModule: not covered"),
    (dict(algo="full"), "lycoris.modules.full.FullModule: no specops path"),
    (dict(algo="diag-oft", bypass_mode=True), "diag-OFT in bypass_mode"),
    (dict(algo="lokr", dora_wd=True, bypass_mode=True), "dora_wd in bypass_mode"),
])
def test_uncovered_modules_are_reported_and_untouched(case, why):
    torch.manual_seed(0)
    net = TwoLayerNet()
    network = create_lycoris(net, 1.0, 4, 1.0, warn_on_unmatched=False, **case)
    network.apply_to()
    report = sl.apply(network)
    assert report["patched"] == [] and set(report["skipped"]) == set(NAMES)
    assert all(w.startswith(why) for w in report["skipped"].values()), report["skipped"]
    assert not any("forward" in m.__dict__ for m in network.modules())


def test_grouped_conv_locon_is_reported():
    report = sl.apply(_network("locon", GeomNet)[1])
    assert report["patched"] == ["lycoris_lin"]
    assert report["skipped"]["lycoris_conv"].startswith("grouped conv (groups=2)")


def test_reflect_padding_and_unapplied_network_are_reported():
    torch.manual_seed(0)
    net = TwoLayerNet()
    net.conv.padding_mode = "reflect"
    network = create_lycoris(net, 1.0, 2, 1.0, algo="loha", warn_on_unmatched=False)
    assert set(sl.apply(network)["skipped"]) == set(NAMES)  # apply_to() not run: nothing calls the modules
    network.apply_to()
    report = sl.apply(network)
    assert report["patched"] == ["lycoris_lin"]
    assert "padding_mode='reflect'" in report["skipped"]["lycoris_conv"]


def test_mixed_dtypes_run_lycoris_forward():
    x, z = (t.detach().double() for t in _inputs())
    net, network = _network("loha")
    ref, ref_network = _network("loha")
    sl.apply(network)
    for n in (net, ref):
        n.double()  # float64 base, float32 adapters: LyCORIS's own casting rules
    with torch.no_grad():
        for a, b in zip(net(x, z), ref(x, z)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unsupported_lycoris_version_warns_and_changes_nothing(monkeypatch):
    _, network = _network("lokr")
    monkeypatch.setattr(sl, "_installed_version", lambda: "5.0.0")
    with pytest.warns(UserWarning, match="lycoris-lora 5.0.0 is outside the supported range >=4.1,<4.2"):
        report = sl.apply(network)
    assert report["patched"] == [] and set(report["skipped"]) == set(NAMES)
    assert not any("forward" in m.__dict__ for m in network.modules())
    monkeypatch.setattr(sl, "_installed_version", lambda: "4.1.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sl.apply(network)["patched"] == NAMES


@pytest.mark.parametrize("case", ["lokr", "loha", "loha-tucker-scalar", "oft", "locon"])
def test_activation_memory_at_most_lycoris(case):
    net, network = _network(case)
    net.requires_grad_(False)  # a frozen base, as LyCORIS trains
    x, z = _inputs()
    lycoris_bytes = saved_for_backward(lambda: net(x, z), [x, z, *net.parameters(), *network.parameters()])
    sl.apply(network)
    assert 0 < saved_for_backward(lambda: net(x, z), [x, z, *net.parameters(), *network.parameters()]) <= lycoris_bytes


@pytest.mark.parametrize("case", ["lokr", "loha", "oft", "locon"])
def test_autocast_matches_lycoris(case, monkeypatch):
    """Under bf16 autocast every patched path runs; outputs and gradients agree to bf16 precision."""
    net, network = _network(case)
    ref, ref_network = _network(case)
    sl.apply(network)
    x, z = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _step(ref, ref_network, x, z)
        _lycoris_forward_forbidden(monkeypatch)
        got = _step(net, network, x, z)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        torch.testing.assert_close(got[k].float(), w.float(), rtol=3e-2, atol=3e-2 * w.abs().max().item(), msg=k)
