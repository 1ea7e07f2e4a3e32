"""ControlNet and T2I-Adapter conditioning on the tiny SDXL-structured UNet: the controlled UNet
equals diffusers' own forward with the same residuals; specops adapters inside a ControlNet
(Control-LoRA) train and export / reload in diffusers' format."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from specops import lora_io, sdxl  # noqa: E402
from specops.sdxl.control import ControlledUNet, controlnet, t2i_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


@pytest.fixture(scope="module")
def batch():
    enc = sdxl.tiny_text_encoders(0)
    b = sdxl.synthetic_batch(enc, batch=1, seed=3, size=8)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # 8x the latent
    return {"unet": {**b["unet"], "control_image": image}, "noise": b["noise"]}


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_controlnet_and_t2i_conditioning_equal_diffusers_own_forward(batch):
    unet = sdxl.tiny_unet(0)
    kw = {k: v for k, v in batch["unet"].items() if k != "control_image"}
    image = batch["unet"]["control_image"]
    cn = controlnet(unet)
    _perturb(cn)  # ControlNet's zero convolutions start at zero: make the residuals count
    with torch.no_grad():
        down, mid = cn(**kw, controlnet_cond=image, conditioning_scale=0.7, return_dict=False)
        want = unet(**kw, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ControlledUNet(unet, controlnet=cn, scale=0.7)(**batch["unet"]).sample
        assert torch.equal(got, want) and not torch.equal(got, unet(**kw).sample)

        ad = t2i_adapter(unet)
        feats = [f * 0.5 for f in ad(image)]
        want = unet(**kw, down_intrablock_additional_residuals=feats).sample
        got = ControlledUNet(unet, adapter=ad, scale=0.5)(**batch["unet"]).sample
        assert torch.equal(got, want) and not torch.equal(got, unet(**kw).sample)
    with pytest.raises(ValueError, match="exactly one of controlnet= and adapter="):
        ControlledUNet(unet)


def test_controlnet_lora_trains_and_exports_in_diffusers_format(batch, tmp_path):
    unet = sdxl.tiny_unet(0)
    torch.manual_seed(0)  # ControlNet's conditioning embedding starts random
    cn = controlnet(unet)
    _perturb(cn)
    sdxl.inject(cn, "lora", preset="full")
    unet.requires_grad_(False)
    model = ControlledUNet(unet, controlnet=cn)
    opt = torch.optim.AdamW(sdxl.param_groups(model, 1e-2).euclidean)
    losses = [sdxl.train_step(model, batch, [opt]) for _ in range(10)]
    assert losses[-1] < losses[0] * 0.99, losses

    path = tmp_path / "control_lora.safetensors"
    report = lora_io.export_lora({"controlnet": cn}, path)
    assert report["max_rel_error"] <= 1e-6 and report["rank"]
    torch.manual_seed(0)
    fresh = controlnet(sdxl.tiny_unet(0))
    _perturb(fresh)  # the same base weights as cn's
    sdxl.apply_lora(fresh, path, prefix="controlnet")
    with torch.no_grad():
        kw = dict(batch["unet"])
        image = kw.pop("control_image")
        a = cn(**kw, controlnet_cond=image, return_dict=False)
        b = fresh(**kw, controlnet_cond=image, return_dict=False)
    for x, y in zip([*a[0], a[1]], [*b[0], b[1]]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
