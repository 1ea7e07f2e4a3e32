"""specops.integrations.peft: apply() runs PEFT's LoRA / LoKr / LoHa / AdaLoRA layers through specops with PEFT's
outputs and gradients, state and files unchanged; revert() gives PEFT's forward back."""
import copy
import io
import warnings

import pytest
import torch
from helpers import GeomNet, TwoLayerNet, WideConvNet, factored_calls, loha_path, saved_for_backward
from torch import nn

peft = pytest.importorskip("peft")

from specops.integrations import peft as sp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


TARGETS = ["lin", "conv"]
CASES = {  # id: PEFT config; r=2 < half the factor sizes factors LoKr's W2 (and W1 with decompose_both)
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3.0, target_modules=TARGETS, init_weights=False),
    "lokr-factored-tucker": lambda: peft.LoKrConfig(r=2, alpha=3.0, target_modules=TARGETS, init_weights=False,
                                                    decompose_both=True, use_effective_conv2d=True),
    "lokr-dense": lambda: peft.LoKrConfig(r=8, alpha=5.0, target_modules=TARGETS, init_weights=False),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3.0, target_modules=TARGETS, init_weights=False),
    "loha-tucker": lambda: peft.LoHaConfig(r=2, alpha=0.5, target_modules=TARGETS, init_weights=False,
                                           use_effective_conv2d=True),
    "lora": lambda: peft.LoraConfig(r=3, lora_alpha=5.0, target_modules=TARGETS, init_lora_weights=False),
}
# PEFT 0.21's HadaWeightCP.backward (LoHa Tucker conv) returns wrong gradients for these two (it reuses
# the other half's rebuild); the patched path gives autograd's, checked by gradcheck below.
PEFT_WRONG = {"conv.hada_w1_a.default", "conv.hada_w2_a.default"}


def _model(config, adapter="default", seed=0):
    torch.manual_seed(seed)
    return peft.get_peft_model(TwoLayerNet(), config, adapter_name=adapter)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=g, dtype=dtype, requires_grad=True)
    z = torch.randn(2, 6, 7, 7, generator=g, dtype=dtype, requires_grad=True)
    return x, z


def _step(model, x, z):
    """Outputs and the gradients of a fixed random projection of them w.r.t. x, z and every trainable parameter."""
    outs = model(x, z)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, [x, z, *params], materialize_grads=True)  # dropped adapters: zeros
    short = [n.removeprefix("base_model.model.") for n in names]
    return dict(zip(["y_lin", "y_conv", "grad_x", "grad_z", *short], [*outs, *grads]))


def _assert_close(got, want, skip=()):
    assert got.keys() == want.keys()
    for k in want:
        if k not in skip:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6 * want[k].abs().max().item(), msg=k)


def _peft_forward_forbidden(monkeypatch, model):
    """Make PEFT's own forward raise on the model's tuner layer classes: the patched path must not fall back."""
    def forbidden(*args, **kwargs):
        raise AssertionError("PEFT's forward ran")

    for m in (model.base_model.model.lin, model.base_model.model.conv):
        monkeypatch.setattr(type(m), "forward", forbidden)


@pytest.mark.parametrize("case", list(CASES))
def test_apply_matches_peft(case, monkeypatch):
    model = _model(CASES[case]())
    x, z = _inputs()
    torch.manual_seed(5)
    want = _step(model, x, z)
    rng = torch.get_rng_state()
    report = sp.apply(model)
    assert report["patched"] == ["base_model.model.lin", "base_model.model.conv"] and report["skipped"] == {}
    assert list(report["notes"]) == (["base_model.model.conv"] if case == "loha-tucker" else [])
    torch.manual_seed(5)
    with monkeypatch.context() as mp:
        _peft_forward_forbidden(mp, model)
        got = _step(model, x, z)
    assert torch.equal(torch.get_rng_state(), rng)  # PEFT's module-dropout draws are made
    _assert_close(got, want, skip=PEFT_WRONG if case == "loha-tucker" else ())
    if case == "loha-tucker":  # PEFT's two wrong gradients (the note says so; gradcheck checks ours)
        assert "wrong gradients" in report["notes"]["base_model.model.conv"]
        assert not any(torch.allclose(got[k], want[k], rtol=1e-3) for k in PEFT_WRONG)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x, z)[1], want["y_conv"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_apply_matches_peft_on_odd_geometry(method, monkeypatch):
    config = getattr(peft, {"lokr": "LoKrConfig", "loha": "LoHaConfig"}[method])
    torch.manual_seed(0)
    model = peft.get_peft_model(GeomNet(), config(r=2, alpha=3.0, target_modules=TARGETS, init_weights=False))
    x, z = torch.randn(3, 21, requires_grad=True), torch.randn(2, 6, 9, 9, requires_grad=True)
    want = _step(model, x, z)
    assert len(sp.apply(model)["patched"]) == 2
    _peft_forward_forbidden(monkeypatch, model)
    _assert_close(_step(model, x, z), want)


@pytest.mark.parametrize("factored", [True, False])
def test_loha_factored_and_merged_match_peft(factored, monkeypatch):
    """LoHa's rank-r² path (C D, no ΔW) and its merged W0 + ΔW path, each forced on the Linear and the conv:
    PEFT's values and gradients."""
    model = _model(CASES["loha"]())
    x, z = _inputs()
    want = _step(model, x, z)
    sp.apply(model)
    _peft_forward_forbidden(monkeypatch, model)
    with loha_path(monkeypatch, factored) as calls:
        got = _step(model, x, z)
    assert len(calls) == 2
    _assert_close(got, want)


@pytest.mark.parametrize("case", ["lokr", "lokr-factored-tucker", "lokr-dense"])
def test_factored_lokr_conv_matches_peft(case, monkeypatch):
    """A conv wide enough for the factored LoKr path (ΔW never formed): PEFT's values and gradients."""
    torch.manual_seed(0)
    model = peft.get_peft_model(WideConvNet(), CASES[case]())
    x = torch.randn(2, 5, 24, requires_grad=True)
    z = torch.randn(2, 32, 9, 9, requires_grad=True)
    want = _step(model, x, z)
    sp.apply(model)
    _peft_forward_forbidden(monkeypatch, model)
    with factored_calls(monkeypatch, sp) as calls:
        got = _step(model, x, z)
    assert calls == [True]
    _assert_close(got, want)


@pytest.mark.parametrize("case", ["lokr-factored-tucker", "loha-tucker", "lora"])
def test_patched_gradcheck_float64(case, monkeypatch):
    """Fast-mode gradcheck of the patched layers (PEFT's own Tucker LoHa conv fails it)."""
    model = _model(CASES[case]()).double()
    sp.apply(model)
    _peft_forward_forbidden(monkeypatch, model)
    lin, conv = model.base_model.model.lin, model.base_model.model.conv
    x, z = _inputs(torch.float64)
    x, z = x.detach()[:1, :2].requires_grad_(), z.detach()[:1, :, :4, :4].requires_grad_()
    for layer, inp in ((lin, x), (conv, z)):
        params = [p for p in layer.parameters() if p.requires_grad]
        # parameters passed as leaves of their own so gradcheck perturbs them; the layer reads them in place
        leaves = [p.detach().clone().requires_grad_() for p in params]
        f = lambda i, *ps: _call_with(layer, params, i, ps)  # noqa: E731
        assert torch.autograd.gradcheck(f, (inp, *leaves), fast_mode=True)


def _call_with(layer, params, inp, values):
    """layer(inp) with its parameters temporarily swapped for `values` (differentiable tensors)."""
    names = {id(p): n for n, p in layer.named_parameters()}
    saved = {}
    for p, v in zip(params, values):
        owner_name, _, key = names[id(p)].rpartition(".")
        owner = layer.get_submodule(owner_name)
        saved[(owner_name, key)] = owner._parameters[key]
        owner._parameters[key] = v
    try:
        return layer(inp)
    finally:
        for (owner_name, key), p in saved.items():
            layer.get_submodule(owner_name)._parameters[key] = p


def test_state_dict_and_saved_files_unchanged(tmp_path):
    model = _model(CASES["lokr"]())
    before = model.state_dict()
    model.save_pretrained(tmp_path / "peft")
    sp.apply(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(tmp_path / "patched")
    files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "patched").iterdir())
    for name in files:
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "patched" / name).read_bytes()


def test_deepcopy_and_torch_save_keep_the_patch():
    x, z = _inputs()
    model = _model(CASES["lokr"]())
    sp.apply(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        want = model(x, z)
        for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            lin = other.base_model.model.lin
            assert lin.forward.module is lin  # bound to the copy, not to the original
            for a, b in zip(other(x, z), want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert sp.revert(other) == ["base_model.model.lin", "base_model.model.conv"]


@pytest.mark.parametrize("case", ["lokr", "loha", "lora"])
def test_merge_unmerge_and_merge_and_unload(case):
    x, z = _inputs()
    ref, model = _model(CASES[case]()), _model(CASES[case]())
    sp.apply(model)
    with torch.no_grad():
        for m in (ref, model):
            m.merge_adapter()
        for a, b in zip(model(x, z), ref(x, z)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for m in (ref, model):
            m.unmerge_adapter()
        assert not model.base_model.model.lin.merged
        for a, b in zip(model(x, z), ref(x, z)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        merged = model.merge_and_unload()
        for a, b in zip(merged(x, z), ref.merge_and_unload()(x, z)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert type(merged.lin) is nn.Linear


@pytest.mark.parametrize("case", ["lokr", "loha", "lora"])
def test_two_adapters_switching_and_both_active(case):
    x, z = _inputs()
    ref, model = _model(CASES[case](), "one"), _model(CASES[case](), "one")
    for m in (ref, model):
        torch.manual_seed(7)
        m.add_adapter("two", CASES[case]())
    sp.apply(model)
    for active in ("two", "one", ["one", "two"]):
        for m in (ref, model):
            m.base_model.set_adapter(active)
        _assert_close(_step(model, x, z), _step(ref, x, z))
    with model.disable_adapter(), ref.disable_adapter():
        for a, b in zip(model(x, z), ref(x, z)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a disabled model gives the base net's outputs
    with model.disable_adapter():
        net = model.base_model.model
        torch.testing.assert_close(model(x, z)[0], nn.functional.linear(x, net.lin.base_layer.weight,
                                                                        net.lin.base_layer.bias))


def test_scaling_is_read_at_every_call():
    x, z = _inputs()
    ref, model = _model(CASES["lokr"]()), _model(CASES["lokr"]())
    sp.apply(model)
    for m in (ref, model):
        for layer in (m.base_model.model.lin, m.base_model.model.conv):
            layer.set_scale("default", 0.3)
    with torch.no_grad():
        for a, b in zip(model(x, z), ref(x, z)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_revert_restores_peft_forward_and_apply_again():
    x, z = _inputs()
    model = _model(CASES["loha"]())
    lin = model.base_model.model.lin
    with torch.no_grad():
        want = model(x, z)
    assert sp.apply(model) == sp.apply(model)  # idempotent
    assert "forward" in lin.__dict__
    assert sp.revert(model) == ["base_model.model.lin", "base_model.model.conv"]
    assert "forward" not in lin.__dict__ and lin.forward.__func__ is type(lin).forward
    with torch.no_grad():
        for a, b in zip(model(x, z), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sp.revert(model) == []
    assert sp.apply(model)["patched"] == ["base_model.model.lin", "base_model.model.conv"]
    with torch.no_grad():
        for a, b in zip(model(x, z), want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_dropout_layers_run_peft_in_training_and_are_noted():
    x, z = _inputs()
    config = lambda: peft.LoKrConfig(r=2, alpha=3.0, target_modules=TARGETS, init_weights=False,  # noqa: E731
                                     module_dropout=0.5, rank_dropout=0.25)
    ref, model = _model(config()), _model(config())
    report = sp.apply(model)
    assert set(report["notes"]) == {"base_model.model.lin", "base_model.model.conv"}
    assert "dropout" in report["notes"]["base_model.model.lin"]
    for seed in range(3):  # the same random masks as PEFT's
        torch.manual_seed(seed)
        want = _step(ref, x, z)
        torch.manual_seed(seed)
        _assert_close(_step(model, x, z), want)
    ref.eval(), model.eval()
    _assert_close(_step(model, x, z), _step(ref, x, z))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_uncovered_layers_are_reported_and_untouched():
    torch.manual_seed(0)
    net = nn.ModuleDict({"lin": nn.Linear(24, 36), "conv": nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
                         "extra": nn.Conv2d(8, 8, 1)})
    net = peft.inject_adapter_in_model(peft.LoHaConfig(r=2, target_modules=["lin", "conv"]), net)
    net = peft.inject_adapter_in_model(peft.OFTConfig(r=4, oft_block_size=0, target_modules=["extra"]), net,
                                       adapter_name="oft")
    net = nn.ModuleDict({"m": net})
    net = peft.inject_adapter_in_model(peft.LoKrConfig(r=2, target_modules=["lin"]), net, adapter_name="outer")
    report = sp.apply(net)
    assert report["patched"] == ["m.lin.base_layer"]  # the LoHa layer under the LoKr one
    assert set(report["skipped"]) == {"m.lin", "m.conv", "m.extra"}
    assert "nested" in report["skipped"]["m.lin"]
    assert "padding_mode='reflect'" in report["skipped"]["m.conv"]
    assert "peft.tuners.oft.layer.Conv2d: no specops path" in report["skipped"]["m.extra"]
    assert sp.revert(net) == ["m.lin.base_layer"]
    assert not any("forward" in m.__dict__ for m in net.modules())


def test_unsupported_peft_version_warns_and_changes_nothing(monkeypatch):
    model = _model(CASES["lokr"]())
    monkeypatch.setattr(peft, "__version__", "0.30.0")
    with pytest.warns(UserWarning, match="peft 0.30.0 is outside the supported range >=0.21,<0.22"):
        report = sp.apply(model)
    assert report["patched"] == [] and set(report["skipped"]) == {"base_model.model.lin", "base_model.model.conv"}
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(peft, "__version__", "0.21.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(sp.apply(model)["patched"]) == 2


@pytest.mark.parametrize("case", ["lokr", "loha", "lora"])
def test_low_precision_base_and_autocast(case, monkeypatch):
    """A bf16 base with PEFT's float32 adapters: LoKr's and LoRA's Linear add in float32 as PEFT does; the fused
    layers, whose dtypes differ, run PEFT's own forward (bit-equal). Under autocast every patched path runs."""
    torch.manual_seed(0)
    ref, model = (peft.get_peft_model(TwoLayerNet().to(torch.bfloat16), CASES[case]()) for _ in range(2))
    model.load_state_dict(ref.state_dict())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # PEFT's upcast
    sp.apply(model)
    x, z = (t.detach().to(torch.bfloat16) for t in _inputs())
    with torch.no_grad():
        got, want = model(x, z), ref(x, z)
        assert all(g.dtype == torch.bfloat16 for g in got)
        lin_tol = {"rtol": 1e-2, "atol": 1e-2} if case in ("lokr", "lora") else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got[0], want[0], **lin_tol)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for m in (ref, model):
        m.float()
    x, z = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # outputs and gradients, to bf16 precision
        want = _step(ref, x, z)
        _peft_forward_forbidden(monkeypatch, model)
        got = _step(model, x, z)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        torch.testing.assert_close(got[k].float(), w.float(), rtol=3e-2, atol=3e-2 * w.abs().max().item(), msg=k)


@pytest.mark.parametrize("case", ["lokr", "loha", "loha-tucker", "lora"])
def test_activation_memory_at_most_peft(case):
    model = _model(CASES[case]())
    x, z = _inputs()
    peft_bytes = saved_for_backward(lambda: model(x, z), [x, z, *model.parameters()])
    sp.apply(model)
    assert 0 < saved_for_backward(lambda: model(x, z), [x, z, *model.parameters()]) <= peft_bytes


def test_adalora_linear_matches_peft_and_keeps_its_allocator(monkeypatch, tmp_path):
    """PEFT's AdaLoRA SVDLinear: PEFT's outputs and gradients, its SVDConv2d reported
    skipped; update_and_allocate and save_pretrained run unchanged on the patched model; with
    lora_dropout > 0 training runs PEFT's path and says so."""
    config = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=TARGETS, total_step=20)
    model = _model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    x, z = _inputs()
    want = _step(model, x, z)
    model.save_pretrained(tmp_path / "before")
    report = sp.apply(model)
    assert report["patched"] == ["base_model.model.lin"]
    assert "SVDConv2d: no specops path" in report["skipped"]["base_model.model.conv"] and report["notes"] == {}
    with monkeypatch.context() as mp:
        mp.setattr(type(model.base_model.model.lin), "forward", lambda *a, **k: pytest.fail("PEFT's forward ran"))
        got = _step(model, x, z)
    _assert_close(got, want)
    sum(o.sum() for o in model(x, z)).backward()  # (PEFT's allocator reads .grad)
    model.base_model.update_and_allocate(0)
    model.save_pretrained(tmp_path / "after")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / f).read_bytes() == (tmp_path / "after" / f).read_bytes()
    dropped = _model(peft.AdaLoraConfig(init_r=4, target_r=2, lora_dropout=0.1, target_modules=["lin"], total_step=20))
    assert "dropout > 0" in sp.apply(dropped)["notes"]["base_model.model.lin"]
