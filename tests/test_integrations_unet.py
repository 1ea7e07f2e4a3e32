"""The integrations on the tiny SDXL-structured UNet: a PEFT model and a LyCORIS network, each with LoKr
on the resnet convs, LoHa on the feed-forward Linears and OFT on the attention projections, trained 20
SGD steps with and without apply(); losses and every trained parameter agree within 1e-5.

Two blocks are adapted (down_blocks.1, up_blocks.1: every layer kind there) so the runs stay short;
`python -m specops.bench peers` times the whole model."""
import copy

import pytest
import torch

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytest.importorskip("lycoris")

from lycoris import LycorisNetwork  # noqa: E402

from specops import sdxl  # noqa: E402
from specops.integrations import lycoris as sl  # noqa: E402
from specops.integrations import peft as sp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "lycoris_state")

STEPS, LR = 20, 1.0  # SGD: a large step on this small loss, so the parameters move (checked below)
BLOCKS = r"(down_blocks\.1|up_blocks\.1)\."
PEFT_TARGETS = {  # adapter name -> (config class, options, target regex)
    "kr": (peft.LoKrConfig, dict(r=2, alpha=2), BLOCKS + r".*resnets\.\d+\.conv[12]$"),
    "ha": (peft.LoHaConfig, dict(r=2, alpha=2), BLOCKS + r".*ff\.net\.(0\.proj|2)$"),
    "oft": (peft.OFTConfig, dict(oft_block_size=4, r=0), BLOCKS + r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(1, 4, 4, 4, generator=g), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(1, 7, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 64, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)})


def _peft_unet():
    unet = sdxl.tiny_unet(0)
    torch.manual_seed(1)
    for name, (config, options, targets) in PEFT_TARGETS.items():
        unet = peft.inject_adapter_in_model(config(target_modules=targets, init_weights=False, **options), unet,
                                            adapter_name=name)
    return unet, unet


def _lycoris_unet():
    unet = sdxl.tiny_unet(0)
    LycorisNetwork.apply_preset({
        "enable_conv": True, "lora_prefix": "lycoris", "target_module": ["Attention", "FeedForward", "ResnetBlock2D"],
        "target_name": [], "module_algo_map": {"Attention": {"algo": "diag-oft"}, "FeedForward": {"algo": "loha"},
                                               "ResnetBlock2D": {"algo": "lokr"}}})
    net = LycorisNetwork(torch.nn.ModuleList([unet.down_blocks[1], unet.up_blocks[1]]), lora_dim=2, conv_lora_dim=2,
                         alpha=2, warn_on_unmatched=False)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LyCORIS starts at ΔW = 0: move every factor off zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    unet.requires_grad_(False)
    net.requires_grad_(True)
    return unet, net


def _train(unet, params):
    opt = torch.optim.SGD(params, lr=LR)
    inputs, losses = _inputs(), []
    for _ in range(STEPS):
        loss = unet(**inputs).sample.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach() for p in params]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # three adapters, one per tuner type
@pytest.mark.parametrize("peer", ["peft", "lycoris"])
def test_twenty_steps_with_apply_match_without(peer):
    build, integration = (_peft_unet, sp) if peer == "peft" else (_lycoris_unet, sl)
    unet, holder = build()
    params = [p for p in holder.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    patched_unet, patched_holder = copy.deepcopy((unet, holder))
    report = integration.apply(patched_holder)
    patched = {f"{type(m).__module__}.{type(m).__name__}" for m in map(patched_holder.get_submodule, report["patched"])}
    if peer == "peft":
        assert patched == {"peft.tuners.lokr.layer.Conv2d", "peft.tuners.loha.layer.Linear",
                           "peft.tuners.oft.layer.Linear"}
        assert not report["skipped"]
    else:
        assert patched == {"lycoris.modules.lokr.LokrModule", "lycoris.modules.loha.LohaModule",
                           "lycoris.modules.diag_oft.DiagOFTModule"}
        assert not report["skipped"]
    want_losses, want = _train(unet, params)
    got_losses, got = _train(patched_unet, [p for p in patched_holder.parameters() if p.requires_grad])
    assert want_losses[-1] < 0.9 * want_losses[0]  # it trained
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=0)
    names = [n for n, p in holder.named_parameters() if p.requires_grad]
    for name, g, w, s in zip(names, got, want, start):
        assert (w - s).abs().max() > 0, name  # it trained
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * w.abs().max().item(), msg=name)
