"""specops.integrations.peft on PEFT's OFT: the Linear layers run their rotation through block_diag_matmul with
PEFT's own blocks (outputs and every gradient equal PEFT's, state and files unchanged); the Conv2d layers, whose
rotation acts on unfolded patches, stay on PEFT's path and are reported."""
import pytest
import torch
from helpers import TwoLayerNet

peft = pytest.importorskip("peft")

from specops.integrations import peft as sp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # id: OFTConfig keywords (oft_block_size 4: six blocks on the Linear's 24 inputs)
    "neumann": {},
    **{f"neumann-{k}-terms": {"num_cayley_neumann_terms": k} for k in (2, 3, 4, 7)},
    "neumann-one-24-block": {"oft_block_size": 24},  # above the cpp kernel's loop size
    "exact-cayley": {"use_cayley_neumann": False},
    "block-share": {"block_share": True},
    "coft": {"coft": True, "eps": 1e-3},
}


def _model(adapter="default", seed=0, **kw):
    torch.manual_seed(seed)
    config = peft.OFTConfig(**{"oft_block_size": 4, "r": 0, "target_modules": ["lin"], "init_weights": False, **kw})
    return peft.get_peft_model(TwoLayerNet(), config, adapter_name=adapter)


def _step(model, x):
    y = model(x, torch.zeros(1, 6, 3, 3))[0]
    g = torch.Generator().manual_seed(2)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, [x, *params])
    return dict(zip(["y", "grad_x", *names], [y, *grads]))


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6 * want[k].abs().max().item(), msg=k)


def _x(dtype=torch.float32):
    return torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1), dtype=dtype).requires_grad_()


def _forbid_peft(monkeypatch, model):
    def forbidden(*args, **kwargs):
        raise AssertionError("PEFT's forward ran")

    monkeypatch.setattr(type(model.base_model.model.lin), "forward", forbidden)


@pytest.mark.parametrize("case", list(CASES))
def test_oft_linear_matches_peft(case, monkeypatch):
    ref, model = _model(**CASES[case]), _model(**CASES[case])
    x = _x()
    want = _step(ref, x)
    report = sp.apply(model)
    assert report["patched"] == ["base_model.model.lin"] and report["skipped"] == {}
    with monkeypatch.context() as mp:
        _forbid_peft(mp, model)
        got = _step(model, x)
    _assert_close(got, want)
    if case == "coft":  # PEFT's in-place projection ran on both
        torch.testing.assert_close(model.base_model.model.lin.oft_R["default"].weight,
                                   ref.base_model.model.lin.oft_R["default"].weight, rtol=0, atol=0)


def test_oft_linear_gradcheck_float64(monkeypatch):
    model = _model().double()
    sp.apply(model)
    _forbid_peft(monkeypatch, model)
    lin = model.base_model.model.lin
    R = lin.oft_R["default"]
    x = _x(torch.float64).detach()[:1, :2].requires_grad_()
    w = R.weight.detach().clone().requires_grad_()

    def f(inp, weight):
        saved = R._parameters["weight"]
        R._parameters["weight"] = weight
        try:
            return lin(inp)
        finally:
            R._parameters["weight"] = saved

    assert torch.autograd.gradcheck(f, (x, w), fast_mode=True)


def test_two_adapters_state_dict_files_and_merge(tmp_path):
    ref, model = _model("one"), _model("one")
    for m in (ref, model):
        torch.manual_seed(7)
        m.add_adapter("two", peft.OFTConfig(oft_block_size=4, r=0, target_modules=["lin"], init_weights=False))
    ref.save_pretrained(tmp_path / "peft")
    before = model.state_dict()
    sp.apply(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.save_pretrained(tmp_path / "patched")
    for f in (tmp_path / "peft").rglob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "patched" / f.relative_to(tmp_path / "peft")).read_bytes()
    x = _x()
    for active in ("two", "one", ["one", "two"]):
        for m in (ref, model):
            m.base_model.set_adapter(active)
        _assert_close(_step(model, x), _step(ref, x))
    with torch.no_grad():
        for m in (ref, model):
            m.merge_adapter()
        torch.testing.assert_close(model(x, torch.zeros(1, 6, 3, 3))[0], ref(x, torch.zeros(1, 6, 3, 3))[0],
                                   rtol=0, atol=0)


def test_bf16_input_and_autocast(monkeypatch):
    """A bf16 input with PEFT's fp32 blocks: PEFT casts x to the blocks' dtype, rotates, casts back; the same here."""
    ref, model = _model(), _model()
    sp.apply(model)
    x = _x().detach().to(torch.bfloat16)
    for m in (ref, model):
        m.to(torch.bfloat16)
    with torch.no_grad():
        got, want = model(x, torch.zeros(1, 6, 3, 3, dtype=torch.bfloat16))[0], ref(
            x, torch.zeros(1, 6, 3, 3, dtype=torch.bfloat16))[0]
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_oft_conv_is_reported_and_left_to_peft():
    torch.manual_seed(0)
    config = peft.OFTConfig(oft_block_size=2, r=0, target_modules=["lin", "conv"], init_weights=False)
    model = peft.get_peft_model(TwoLayerNet(), config)
    report = sp.apply(model)
    assert report["patched"] == ["base_model.model.lin"]
    assert "peft.tuners.oft.layer.Conv2d: no specops path" in report["skipped"]["base_model.model.conv"]
    assert "unfolded patches" in report["skipped"]["base_model.model.conv"]
    assert sp.revert(model) == ["base_model.model.lin"]
