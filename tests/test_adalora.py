"""specops.adalora against HF PEFT's AdaLoRA (an oracle: same model, initial weights, data and
optimiser), step by step, and the adapter's own checks."""
import pytest
import torch
from torch import nn

from specops import adalora, lora_io, sdxl
from specops.testing import rel_err

F64 = torch.float64
peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


SCHEDULE = dict(tinit=10, tfinal=30, deltaT=5, total_step=200, beta1=0.85, beta2=0.85)


def _pair():
    """A PEFT AdaLoRA model and a specops one with the same base and adapter weights (float64)."""
    torch.manual_seed(0)
    base = Net().double()
    ours = Net().double()
    ours.load_state_dict(base.state_dict())
    config = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, lora_dropout=0.0,
                                target_modules=["l1", "l2", "l3"], **SCHEDULE)
    theirs = peft.get_peft_model(base, config)
    for name, p in theirs.named_parameters():
        if "ranknum" in name:  # a constant (r) that PEFT 0.21 leaves requiring grad: SGD would move it
            p.requires_grad_(False)
    layers = sdxl.inject(ours, "adalora", targets=["l1", "l2", "l3"], init_r=6, alpha=8)
    with torch.no_grad():
        for name, layer in layers.items():
            t = theirs.base_model.model.get_submodule(name)
            layer.P.copy_(t.lora_B["default"])
            layer.lam.copy_(t.lora_E["default"].view(-1))
            layer.Q.copy_(t.lora_A["default"])
            layer.lam.normal_()  # PEFT starts λ at 0 too; a non-zero start makes every triplet matter at once
            t.lora_E["default"].copy_(layer.lam.view(-1, 1))
    return theirs, ours, layers


def test_matches_peft_step_by_step():
    theirs, ours, layers = _pair()
    alloc = adalora.RankAllocator(ours, target_r=3, **SCHEDULE)
    peft_alloc = theirs.base_model.rankallocator
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    masked_steps = 0
    for step in range(SCHEDULE["total_step"]):
        x = torch.randn(32, 12, generator=g, dtype=F64)
        y = torch.randn(32, 8, generator=g, dtype=F64)
        out_t, out_o = theirs(x), ours(x)
        assert rel_err(out_o, out_t) <= 1e-6, f"step {step}: {rel_err(out_o, out_t):.3g}"
        for out, opt in ((out_t, opt_t), (out_o, opt_o)):
            nn.functional.mse_loss(out, y).backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)
        budget = alloc.update_and_allocate(step)
        assert budget == peft_alloc.budget_schedule(step)[0] or step >= SCHEDULE["total_step"] - SCHEDULE["tfinal"]
        for name, layer in layers.items():
            t = theirs.base_model.model.get_submodule(name)
            assert torch.equal(layer.lam == 0, t.lora_E["default"].view(-1) == 0), f"step {step}: {name} mask"
            for ours_f, theirs_f in (("Q", "lora_A"), ("P", "lora_B"), ("lam", "lora_E")):
                key = f"base_model.model.{name}.{theirs_f}.default"
                if key in peft_alloc.exp_avg_ipt:  # (PEFT empties them at the final phase, as ours zero)
                    for mine, peft_ema in (("ema_ipt_", peft_alloc.exp_avg_ipt), ("ema_unc_", peft_alloc.exp_avg_unc)):
                        torch.testing.assert_close(getattr(layer, mine + ours_f), peft_ema[key].view(-1).view_as(
                            getattr(layer, mine + ours_f)), rtol=1e-6, atol=1e-12)
        masked_steps += any(int((m.lam == 0).sum()) for m in layers.values())
        opt_t.zero_grad()
        opt_o.zero_grad()
    assert masked_steps > 50
    assert sum(alloc.ranks().values()) == 3 * 3


def test_regularizer_is_peft_formula():
    theirs, ours, layers = _pair()
    alloc = adalora.RankAllocator(ours, target_r=3, **SCHEDULE)
    want = 0
    for layer in layers.values():
        eye = torch.eye(6, dtype=F64)
        want = want + torch.norm(layer.Q @ layer.Q.T - eye) + torch.norm(layer.P.T @ layer.P - eye)
    torch.testing.assert_close(alloc.regularizer(), want / 6)


def test_lora_factors_export_the_kept_rank_exactly():
    _, ours, layers = _pair()
    layer = layers["l2"]
    with torch.no_grad():
        layer.lam[[1, 4]] = 0
    B, A = layer.lora_factors()
    assert B.shape == (16, 4) and A.shape == (4, 16)
    torch.testing.assert_close(B @ A, layer.delta_weight(), rtol=1e-12, atol=1e-14)
    x = torch.randn(5, 16, dtype=F64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ (B @ A).T, rtol=1e-12, atol=1e-13)


def test_hot_path_gradcheck():
    _, _, layers = _pair()
    layer = layers["l1"]
    x = torch.randn(3, 12, dtype=F64, requires_grad=True)
    params = [layer.P, layer.lam, layer.Q]
    assert torch.autograd.gradcheck(lambda x, P, lam, Q: torch.func.functional_call(
        layer, {"P": P, "lam": lam, "Q": Q}, (x,)), (x, *params))


def _train(model, alloc, opt, steps, start=0, reg=0.1):
    g = torch.Generator().manual_seed(7)
    for step in range(SCHEDULE["total_step"]):
        x, y = torch.randn(16, 12, generator=g, dtype=F64), torch.randn(16, 8, generator=g, dtype=F64)
        if not start <= step < start + steps:
            continue
        (nn.functional.mse_loss(model(x), y) + reg * alloc.regularizer()).backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()


def _plain():
    """A Net with _pair's base weights and no adapter."""
    torch.manual_seed(0)
    return Net().double()


@pytest.mark.parametrize("split", [100, 185], ids=["budget-phase", "final-phase"])
def test_resume_continues_exactly(split, tmp_path):
    """split steps, save_adapters, load_adapters into a fresh model without adapters, the rest ==
    every step uninterrupted (the file holds the EMAs and the frozen pattern)."""
    full = _pair()[1]
    full_alloc = adalora.RankAllocator(full, target_r=3, **SCHEDULE)
    _train(full, full_alloc, torch.optim.SGD(full.parameters(), lr=0.05), SCHEDULE["total_step"])
    first = _pair()[1]
    _train(first, adalora.RankAllocator(first, target_r=3, **SCHEDULE), torch.optim.SGD(first.parameters(), lr=0.05), split)
    lora_io.save_adapters(first, tmp_path / "live.safetensors")
    resumed = _plain()
    lora_io.load_adapters(resumed, tmp_path / "live.safetensors")
    resumed_alloc = adalora.RankAllocator(resumed, target_r=3, **SCHEDULE)
    _train(resumed, resumed_alloc, torch.optim.SGD(resumed.parameters(), lr=0.05), SCHEDULE["total_step"] - split, split)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert full_alloc.ranks() == resumed_alloc.ranks()


def test_allocator_groups_layers_by_shape_and_follows_replaced_buffers():
    """l1, l2, l3 have three shapes: three groups; two l2-shaped layers share one. A layer whose
    buffers were replaced (here: a state_dict loaded with assign=True) is picked up again."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)).double()
    sdxl.inject(model, "adalora", targets=["0", "1", "2"], init_r=3)
    alloc = adalora.RankAllocator(model, target_r=1, total_step=10)
    assert sorted(len(g.mods) for g in alloc._groups) == [1, 2]
    state = {k: v.clone() + 1 if "ema" in k else v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    want = {n: (m.ema_ipt_lam * m.ema_unc_lam + (m.ema_ipt_Q * m.ema_unc_Q).mean(1) + (m.ema_ipt_P * m.ema_unc_P).mean(0))
            for n, m in alloc.layers.items()}
    assert all(torch.equal(alloc.scores()[n], w) for n, w in want.items())


def test_conv_adapter_is_locon_shaped_and_exports_exactly(tmp_path):
    """AdaLoRA on a 3x3 stride-2 conv: forward == conv with W0 + c P diag(λ) Q reshaped; the kept
    triplets export as an exact LoCon (kohya keys) that load_lora / apply_lora rebuild; the
    Stiefel variant starts orthonormal on the (r, in·kh·kw) matrix."""
    from specops import stiefel
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Linear(5, 5)).double()
    layers = sdxl.inject(model, "adalora", targets=["0"], init_r=4, alpha=6)
    layer = layers["0"]
    with torch.no_grad():
        layer.lam.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0]))
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    c = 6 / (4 + 1e-5)
    W = model[0].base.weight + (c * layer.P @ torch.diag(layer.lam) @ layer.Q).view(6, 4, 3, 3)
    assert rel_err(layer(x), nn.functional.conv2d(x, W, model[0].base.bias, 2, 1)) <= 1e-12
    lora_io.export_lora(model, tmp_path / "k.safetensors", format="kohya")
    (B, A), = lora_io.load_lora(tmp_path / "k.safetensors", model={"unet": model}).values()
    assert A.shape == (3, 4, 3, 3)
    assert rel_err((B @ A.flatten(1)).view(6, 4, 3, 3), layer.delta_weight()) <= 1e-12
    fresh = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Linear(5, 5)).double()
    fresh.load_state_dict({k.replace("base.", ""): v for k, v in model.state_dict().items() if "ema" not in k
                           and k not in ("0.lam", "0.P", "0.Q", "0.frozen_mask")})
    sdxl.apply_lora(fresh, tmp_path / "k.safetensors")
    assert rel_err(fresh[0](x), layer(x)) <= 1e-12
    ortho = sdxl.inject(nn.Sequential(nn.Conv2d(4, 6, 3)), "adalora", targets=["0"], init_r=5, orthogonal="stiefel")["0"]
    assert ortho.Qt.shape == (36, 5) and stiefel.orthogonality_error(ortho.Qt).item() <= 1e-6


def test_param_groups_and_diffusers_export(tmp_path):
    """sdxl.param_groups: P and Qt of the Stiefel variant in the orthogonal group, λ Euclidean;
    export_lora (diffusers keys) holds each layer's kept rank, B A == ΔW, and no entry for a layer
    that kept none."""
    model = _plain()
    layers = sdxl.inject(model, "adalora", targets=["l1", "l2", "l3"], init_r=6, orthogonal="stiefel")
    groups = sdxl.param_groups(model, lr=1e-3)
    assert {id(p) for g in groups.orthogonal for p in g["params"]} == {id(p) for m in layers.values() for p in (m.P, m.Qt)}
    assert {id(p) for g in groups.euclidean for p in g["params"]} == {id(m.lam) for m in layers.values()}
    with torch.no_grad():
        for i, m in enumerate(layers.values()):
            m.lam.normal_()
            m.lam[: i + 1] = 0
        layers["l3"].lam.zero_()  # kept no triplet: ΔW = 0, no entry
    report = lora_io.export_lora(model, tmp_path / "d.safetensors")
    loaded = lora_io.load_lora(tmp_path / "d.safetensors", model={"unet": model})
    assert report["rank"]["unet.l3"] == 0 and set(loaded) == {"unet.l1", "unet.l2"}
    for i, (name, m) in enumerate(list(layers.items())[:2]):
        B, A = loaded[f"unet.{name}"]
        assert A.shape[0] == 6 - (i + 1)
        assert rel_err(B @ A, m.delta_weight()) <= 1e-12


def test_orthogonality_op_errors():
    P, Q = torch.randn(6, 3), torch.randn(3, 5)
    with pytest.raises(ValueError, match="non-empty"):
        adalora.orthogonality([], [])
    with pytest.raises(ValueError, match="Q_list: expected 1"):
        adalora.orthogonality([P], [Q, Q])
    with pytest.raises(ValueError, match="disagree on r"):
        adalora.orthogonality([P], [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="dtype"):
        adalora.orthogonality([P], [Q.double()])


def test_compact_keeps_the_output_and_the_run(tmp_path):
    """Compacted at the final phase's start: same outputs (1e-12), ranks as kept, and the rest of the
    run equal to the uncompacted one's re-masking (without the regulariser, which after compaction
    covers the kept triplets only)."""
    end = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    runs = []
    for compact in (False, True):
        _, model, layers = _pair()
        alloc = adalora.RankAllocator(model, target_r=3, **SCHEDULE)
        _train(model, alloc, torch.optim.SGD(model.parameters(), lr=0.05), end + 1)
        x = torch.randn(4, 12, dtype=F64)
        before = model(x)
        if compact:
            alloc.compact()
            assert [m.rank for m in layers.values()] == list(alloc.ranks().values())
            assert sum(m.rank for m in layers.values()) == 9
            assert rel_err(model(x), before) <= 1e-12
            lora_io.save_adapters(model, tmp_path / "compact.safetensors")  # config() holds the kept rank
            model = _plain()
            lora_io.load_adapters(model, tmp_path / "compact.safetensors")
            alloc = adalora.RankAllocator(model, target_r=3, **SCHEDULE)
            assert rel_err(model(x), before) <= 1e-12
        _train(model, alloc, torch.optim.SGD(model.parameters(), lr=0.05), SCHEDULE["total_step"] - end - 1, end + 1, reg=0.0)
        runs.append(model(x))
    assert rel_err(runs[1], runs[0]) <= 1e-10


def test_stiefel_variant_stays_orthonormal():
    """orthogonal="stiefel": 1000 float32 steps (StiefelAdam on P and Qt, Adam on λ) with masking all
    along: P and Q orthonormal to 1e-5 at the end, the budget met, the loss down."""
    from specops import StiefelAdam, stiefel
    torch.manual_seed(0)
    model = Net()
    layers = sdxl.inject(model, "adalora", targets=["l1", "l2", "l3"], init_r=6, orthogonal="stiefel")
    schedule = dict(tinit=50, tfinal=200, deltaT=10, total_step=1000)
    alloc = adalora.RankAllocator(model, target_r=3, **schedule)
    ortho = [p for m in layers.values() for p in m.orthogonal_parameters()]
    opts = [StiefelAdam(ortho, lr=1e-2), torch.optim.Adam([m.lam for m in layers.values()], lr=1e-2)]
    g = torch.Generator().manual_seed(2)
    W = torch.randn(12, 8, generator=g)
    losses = []
    for step in range(schedule["total_step"]):
        x = torch.randn(32, 12, generator=g)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ W))
        loss.backward()
        for o in opts:
            o.step()
        alloc.update_and_allocate(step)
        for o in opts:
            o.zero_grad()
        losses.append(loss.item())
    for m in layers.values():
        for p in m.orthogonal_parameters():
            assert p.dtype == torch.float32 and stiefel.orthogonality_error(p).item() <= 1e-5
    assert sum(alloc.ranks().values()) == 9
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50])
