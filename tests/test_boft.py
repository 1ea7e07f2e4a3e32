"""BOFT: specops.adapters.BOFT against its dense definition, and the BOFT layers of PEFT and LyCORIS run through
specops.integrations with their own outputs and gradients."""
import warnings

import pytest
import torch
from torch import nn

from specops.adapters import BOFT, OFT, butterfly, butterfly_gathers


def _dense_rotation(blocks, gathers):
    """B_{m-1} ⋯ B_0 as an n x n matrix, B_i = Π_iᵀ blockdiag(blocks[i]) Π_i."""
    n = blocks.shape[1] * blocks.shape[2]
    R = torch.eye(n, dtype=blocks.dtype)
    for Bi, g in zip(blocks, gathers):
        P = torch.eye(n, dtype=blocks.dtype) if g is None else torch.eye(n, dtype=blocks.dtype)[g]
        R = P.T @ torch.block_diag(*Bi) @ P @ R
    return R


def _layer(conv):
    return nn.Conv2d(8, 16, 3, padding=1) if conv else nn.Linear(32, 16)


@pytest.mark.parametrize("x_grad", [True, False], ids=["in-network", "first-layer"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("opts", [dict(side="output"), dict(side="output", rescale=True, scale=0.6), dict(side="input"),
                                  dict(side="input", rescale=True)], ids=["out", "out-rescale-s", "in", "in-rescale"])
@pytest.mark.parametrize("method", ["boft", "oft"])
def test_training_linear_rotates_activations_as_its_weight(method, opts, bias, x_grad):
    """While a Linear's rotation trains, OFT (output side) and BOFT rotate activations (block_diag_matmul with the
    butterfly's gathers) instead of building W: the same outputs and gradients as one Linear with W (fp64)."""
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=bias).double()
    ad = BOFT(base, block_size=4, stages=2, **opts) if method == "boft" else OFT(base, blocks=4, **opts)
    with torch.no_grad():
        ad.Q.normal_()
        if ad.g is not None:
            ad.g.normal_()
    params = [ad.Q] + ([ad.g] if ad.g is not None else [])
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=x_grad)
    gy = torch.randn(3, 5, 16, dtype=torch.float64)
    outs = []
    for run in (ad, ad._dense_forward):
        y = run(x)
        outs.append((y, *torch.autograd.grad(y, ([x] if x_grad else []) + params, gy)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("side", ["input", "output"])
def test_boft_matches_its_dense_definition(conv, side):
    torch.manual_seed(0)
    ad = BOFT(_layer(conv).double(), block_size=4, side=side, rescale=True)
    with torch.no_grad():
        ad.Q.normal_()
        ad.g.normal_()
    blocks = ad.rotation_blocks()
    m, D, b, _ = blocks.shape
    R = _dense_rotation(blocks, butterfly_gathers(D * b, b, m))
    torch.testing.assert_close(R.T @ R, torch.eye(D * b, dtype=R.dtype), atol=1e-12, rtol=0)
    W0 = ad.base.weight.flatten(1)
    want = ad.g[:, None] * (W0 @ R if side == "input" else R @ W0)
    torch.testing.assert_close(ad.adapted_weight(), want, atol=1e-12, rtol=1e-12)
    x = torch.randn((2, 8, 5, 5) if conv else (3, 32), dtype=torch.double)
    y = ad(x)
    ref = (nn.functional.conv2d(x, want.view(ad.base.weight.shape), ad.base.bias, padding=1) if conv
           else nn.functional.linear(x, want, ad.base.bias))
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)


def test_boft_starts_as_the_identity_and_checks_its_options():
    base = nn.Linear(32, 16)
    ad = BOFT(base, block_size=4)
    assert ad.Q.shape == (4, 8, 4, 4)  # 2^(m-1)·4 | 32: four stages
    x = torch.randn(3, 32)
    torch.testing.assert_close(ad(x), base(x))
    for bad in (dict(block_size=3), dict(block_size=6), dict(block_size=4, stages=5)):
        with pytest.raises(ValueError):
            BOFT(nn.Linear(32, 16), **bad)


def test_boft_gradcheck_float64():
    torch.manual_seed(0)
    ad = BOFT(nn.Linear(16, 8).double(), block_size=4, rescale=True, constraint=0.01)
    with torch.no_grad():
        ad.Q.normal_()
    x = torch.randn(3, 16, dtype=torch.double, requires_grad=True)

    def f(x, Q, g):
        return torch.func.functional_call(ad, {"Q": Q, "g": g}, (x,))

    assert torch.autograd.gradcheck(f, (x, ad.Q.detach().requires_grad_(), ad.g.detach().requires_grad_()))


def test_butterfly_gradcheck_with_general_gathers():
    torch.manual_seed(0)
    blocks = torch.randn(3, 4, 2, 2, dtype=torch.double, requires_grad=True)
    t = torch.randn(8, 3, dtype=torch.double, requires_grad=True)
    gathers = [torch.randperm(8), None, torch.randperm(8)]
    torch.testing.assert_close(butterfly(t, blocks, gathers), _dense_rotation(blocks, gathers) @ t)
    assert torch.autograd.gradcheck(lambda t, B: butterfly(t, B, gathers), (t, blocks))


# ----------------------------------------------------------------------------- the peers' BOFT, patched


def _grads(layer_fn, x, params):
    y = layer_fn(x)
    gen = torch.Generator().manual_seed(2)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    return [y, *torch.autograd.grad(loss, [x, *params])]


def _assert_all_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("conv", [False, True])
def test_peft_boft_patched_matches_peft(conv, tmp_path):
    peft = pytest.importorskip("peft")
    from specops.integrations import peft as sp

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that its CUDA block-diagonal extension did not load
        model = peft.inject_adapter_in_model(
            peft.BOFTConfig(boft_block_size=4, target_modules=["layer"], init_weights=False), _Holder(_layer(conv)))
        model.layer.update_layer("second", peft.BOFTConfig(boft_block_size=4, init_weights=False))
    model.layer.set_adapter(["default", "second"])
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4
    x = torch.randn((2, 8, 6, 6) if conv else (3, 5, 32), requires_grad=True)
    want = _grads(model, x, params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sp.apply(model)
    assert report["patched"] == ["layer"] and not report["skipped"]
    _assert_all_close(_grads(model, x, params), want)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sp.revert(model) == ["layer"]
    for a, b in zip(_grads(model, x, params), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_peft_boft_with_butterfly_permutations(monkeypatch):
    """N > 1 stages with PEFT's boft_P permutations (PEFT takes them only with its CUDA block-diagonal
    extension; a torch stand-in for it here)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.boft import layer as boft_layer

    from specops.integrations import peft as sp

    class _FBD:
        @staticmethod
        def forward(blocks):
            return [torch.stack([torch.block_diag(*b) for b in blocks])]

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _FBD)
    monkeypatch.setattr(boft_layer.FastBlockDiag, "apply", staticmethod(lambda b: _FBD.forward(b)[0]))
    torch.manual_seed(0)
    model = peft.inject_adapter_in_model(
        peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["layer"], init_weights=False),
        _Holder(nn.Linear(32, 16)))
    assert model.layer.boft_R["default"].shape[0] == 3
    assert not torch.equal(model.layer.boft_P[1], torch.eye(32))
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(3, 32, requires_grad=True)
    want = _grads(model, x, params)
    assert sp.apply(model)["patched"] == ["layer"]
    _assert_all_close(_grads(model, x, params), want)


def test_peft_boft_dropout_runs_peft_in_training():
    peft = pytest.importorskip("peft")
    from specops.integrations import peft as sp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.inject_adapter_in_model(
            peft.BOFTConfig(boft_block_size=4, boft_dropout=0.5, target_modules=["layer"]), _Holder(nn.Linear(32, 16)))
    report = sp.apply(model)
    assert "dropout" in report["notes"]["layer"]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("bypass", [False, True])
@pytest.mark.parametrize("multiplier, rescaled, constraint", [(1.0, False, 0.0), (0.7, True, 0.0), (1.0, True, 1e-3)])
@pytest.mark.parametrize("train_base", [True, False], ids=["base-trains", "base-frozen"])
def test_lycoris_boft_patched_matches_lycoris(conv, bypass, multiplier, rescaled, constraint, train_base, monkeypatch):
    pytest.importorskip("lycoris")
    from lycoris.modules.boft import ButterflyOFTModule

    from specops.integrations import lycoris as sl

    monkeypatch.setattr(sl, "BUTTERFLY_ROWS_MAX_STAGES", 8)  # LyCORIS's 3 stages here: the activation path too

    torch.manual_seed(0)
    base = _layer(conv)
    mod = ButterflyOFTModule("l", base, multiplier=multiplier, lora_dim=4, rescaled=rescaled,
                             constraint=constraint, bypass_mode=bypass)
    mod.apply_to()
    with torch.no_grad():
        mod.oft_blocks.normal_(0, 0.3)
        if rescaled:
            mod.rescale.normal_(1, 0.2)
    # a training base weight: LyCORIS counts its gradient twice; a frozen one: the patched Linear rotates W0 x
    base.requires_grad_(train_base)
    params = [*mod.parameters(), *(base.parameters() if train_base else ())]
    x = torch.randn((2, 8, 6, 6) if conv else (3, 5, 32), requires_grad=True)
    want = _grads(base, x, params)
    assert sl.apply(mod)["patched"] == ["l"]
    _assert_all_close(_grads(base, x, params), want)
    assert sl.revert(mod) == ["l"]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("peer", ["peft", "lycoris"])
def test_patched_boft_gradcheck_float64(peer, conv):
    """Fast-mode gradcheck of the patched path w.r.t. the input and every adapter parameter, which it
    reads in place at each call (LyCORIS's own BOFT cannot run in float64; the patched path does)."""
    pytest.importorskip(peer)
    torch.manual_seed(0)
    if peer == "peft":
        import peft

        from specops.integrations import peft as integration
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's note that its CUDA block-diagonal extension did not load
            owner = peft.inject_adapter_in_model(
                peft.BOFTConfig(boft_block_size=4, target_modules=["layer"], init_weights=False), _Holder(_layer(conv)))
    else:
        from lycoris.modules.boft import ButterflyOFTModule

        from specops.integrations import lycoris as integration
        base = _layer(conv).double()  # LyCORIS keeps its layer outside its module tree
        owner = ButterflyOFTModule("l", base, lora_dim=4, rescaled=True, constraint=1e-3)
        owner.apply_to()
        with torch.no_grad():
            owner.oft_blocks.normal_(0, 0.3)
            owner.rescale.normal_(1, 0.2)
    owner.double()
    assert integration.apply(owner)["patched"]
    names = [n for n, p in owner.named_parameters() if p.requires_grad]
    leaves = [owner.get_parameter(n).detach().clone().requires_grad_() for n in names]
    x = torch.randn((1, 8, 4, 4) if conv else (1, 2, 32), dtype=torch.float64, requires_grad=True)
    f = lambda i, *ps: torch.func.functional_call(owner, dict(zip(names, ps)), (i,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *leaves), fast_mode=True)
