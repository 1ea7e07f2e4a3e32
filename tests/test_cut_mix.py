"""SVDiff's Cut-Mix-Unmix: the mixed images and prompt, the unmix term (zero exactly for attention
confined to its half, fp64 gradcheck), and the recorder on the tiny SDXL-structured UNet."""
import pytest
import torch

from specops.sdxl.cut_mix import UnmixRecorder, cut_mix, cut_mix_prompt, unmix_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


@pytest.mark.parametrize("W", [8, 7])
def test_cut_mix_puts_each_centre_strip_on_its_half(W):
    a = torch.arange(W, dtype=torch.float64).expand(2, 3, 5, W)  # each pixel holds its column index
    b = 100 + a
    mixed = cut_mix(a, b)
    left, right = W // 2, W - W // 2
    assert mixed.shape == a.shape
    assert torch.equal(mixed[..., :left], a[..., (W - left) // 2:(W - left) // 2 + left])
    assert torch.equal(mixed[..., left:], b[..., (W - right) // 2:(W - right) // 2 + right])
    assert cut_mix_prompt("a [V1] dog", "a [V2] cat") == "a [V1] dog on the left, a [V2] cat on the right"
    with pytest.raises(ValueError, match="two \\(B, C, H, W\\) tensors of one shape"):
        cut_mix(a, b[..., :-1])


def _confined(N=3, h=4, w=6, K=5, t1=(1,), t2=(3,)):
    """Attention probabilities whose subject columns lie on their own halves only."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(N, h * w, K, generator=g, dtype=torch.float64)
    left = torch.arange(h * w) % w < w // 2
    for k in t1:
        p[:, ~left, k] = 0
    for k in t2:
        p[:, left, k] = 0
    return p / p.sum(-1, keepdim=True), left


def test_cut_mix_unmix_term_is_zero_only_for_confined_attention_and_passes_gradcheck():
    p, left = _confined()
    assert unmix_loss(p, ([1], [3]), 6).item() == 0
    leaked = p.clone()
    leaked[0, torch.nonzero(~left)[0, 0], 1] = 0.2  # subject 1 attends one right-half query
    assert unmix_loss(leaked, ([1], [3]), 6).item() > 0
    leaked = p.clone()
    leaked[2, 0, 3] = 0.1  # subject 2 on the left
    assert unmix_loss(leaked, ([1], [3]), 6).item() > 0
    x = torch.rand(2, 12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unmix_loss(t, ([0, 2], [1]), 4), (x,))
    with pytest.raises(ValueError, match="not rows of width 5"):
        unmix_loss(p, ([1], [3]), 5)


def test_cut_mix_recorder_keeps_the_unet_output_and_trains_adapters():
    pytest.importorskip("diffusers")
    from specops import sdxl

    enc = sdxl.tiny_text_encoders(0)
    batch = sdxl.synthetic_batch(enc, batch=1, seed=3, size=8)
    unet = sdxl.tiny_unet(0)
    sdxl.inject(unet, "lora", block_weights={"down_blocks.1": 1.0, "up_blocks.1": 1.0})
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        want = unet(**batch["unet"]).sample
    rec = UnmixRecorder(unet, ([1], [3]), (8, 8))
    got = unet(**batch["unet"]).sample
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    layers = sum(".attn2." in n for n in unet.attn_processors)
    assert len(rec.maps) == layers and all(m.shape[-1] == 2 for m in rec.maps)
    loss = rec.loss()
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    unet(**batch["unet"])
    assert len(rec.maps) == layers  # a new forward replaces the maps
    rec.remove()
    assert not any(type(p).__name__ == "_Processor" for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="two disjoint, non-empty token sets"):
        UnmixRecorder(unet, ([1], [1]), (8, 8))
