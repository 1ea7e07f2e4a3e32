"""The built-in tiny SDXL-structured models, their conditioning and a synthetic denoising batch.

    tiny_unet / tiny_text_encoders   random-init models with the exact SDXL-base structure, built offline
    encode_prompt                    SDXL conditioning from the two text encoders
    synthetic_batch                  a fixed noisy-latent batch for the epsilon objective
    attention_linears                the attention Linear layers an injection targets
    UNET_TARGETS / TEXT_TARGETS      their module-name suffixes in a UNet / a CLIP text encoder

Real SDXL weights load into the same structure (UNet2DConditionModel.from_pretrained) when a user
has them; nothing here downloads anything.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import adapters

__all__ = ["UNET_TARGETS", "TEXT_TARGETS", "tiny_unet", "tiny_text_encoders", "attention_linears", "encode_prompt",
           "synthetic_batch"]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# Tiny widths: SDXL-base's structure (levels, layers, heads per level, text_time embedding, two text
# encoders whose penultimate states are concatenated) at 1/10 of the channels.
_TEXT_WIDTHS = (32, 64)  # CLIP-L / OpenCLIP-bigG stand-ins; cross-attention width = their sum
_TIME_DIM = 8


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init diffusers UNet2DConditionModel with SDXL-base's structure, narrow channels.

    3 levels (no attention, 2 and 10 transformer layers per attention block), cross-attention on a
    96-wide context, the "text_time" added embedding (pooled text 64 + 6 time ids), and the 560
    attention Linear layers under their SDXL names (down_blocks.1.attentions.0.transformer_blocks.0
    .attn1.to_q, ...). Channels (32, 64, 128) instead of (320, 640, 1280). Deterministic in `seed`.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(2, 4, 8), cross_attention_dim=sum(_TEXT_WIDTHS), norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
            projection_class_embeddings_input_dim=_TEXT_WIDTHS[1] + 6 * _TIME_DIM,
            use_linear_projection=True,
        )
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def tiny_text_encoders(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(text_encoder, text_encoder_2): small random CLIP text encoders, the second with projection.

    Hidden widths 32 and 64 (SDXL: 768 and 1280), 2 layers each, vocabulary 1000, 77 positions; the
    second projects its pooled state to 64 (the UNet's text_embeds).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width):
        return CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=_TEXT_WIDTHS[1],
                              bos_token_id=0, eos_token_id=2)  # CLIP's own ids lie outside the tiny vocabulary

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(config(_TEXT_WIDTHS[0]))
        te2 = CLIPTextModelWithProjection(config(_TEXT_WIDTHS[1]))
    return tuple((te if dtype == torch.float32 else te.to(dtype)).eval() for te in (te1, te2))


def attention_linears(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Names of the nn.Linear (or adapter) modules of `model` whose name ends with a target."""
    targets = _targets(model, targets)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, adapters.Adapter)) and _matches(name, targets)]


def encode_prompt(text_encoders, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """SDXL conditioning: (penultimate states of both encoders concatenated, pooled projection of the 2nd)."""
    te1, te2 = text_encoders
    h1 = te1(input_ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(input_ids, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def noised(x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise with the SDXL (scaled-linear, 1000-step) schedule."""
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[timestep]
    abar = abar.to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def synthetic_batch(text_encoders, batch: int = 2, tokens: int = 8, seed: int = 0, size: int = 16) -> dict:
    """A fixed synthetic denoising batch: noisy latents, timesteps, text conditioning and the noise.

    Returns {"unet": kwargs for UNet2DConditionModel.forward, "noise": the target (batch, 4, size, size),
    "x0": the clean latents}; the latents are noised(x0, noise, t).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(text_encoders[0].parameters()).dtype
    ids = torch.randint(0, text_encoders[0].config.vocab_size, (batch, tokens), generator=g)
    with torch.no_grad():
        context, pooled = encode_prompt(text_encoders, ids)
    x0 = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    noise = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    time_ids = torch.tensor([size * 8, size * 8, 0, 0, size * 8, size * 8], dtype=dtype).expand(batch, 6)
    return {
        "unet": dict(sample=noised(x0, noise, t), timestep=t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}),
        "noise": noise, "x0": x0,
    }


def with_prompt(batch: dict, text_encoders, input_ids: Tensor) -> dict:
    """`batch` conditioned on `input_ids` through the encoders, with gradient (textual inversion,
    text-encoder adapters): a new dict, the latents, timesteps and noise shared."""
    context, pooled = encode_prompt(text_encoders, input_ids)
    cond = {**batch["unet"]["added_cond_kwargs"], "text_embeds": pooled}
    return {**batch, "unet": {**batch["unet"], "encoder_hidden_states": context, "added_cond_kwargs": cond}}


# Which layers are targets; inject uses the same rules.


def _is_text_encoder(model: nn.Module) -> bool:
    return str(getattr(getattr(model, "config", None), "model_type", "")).startswith("clip")


def _targets(model, targets):
    if targets is None:
        return TEXT_TARGETS if _is_text_encoder(model) else UNET_TARGETS
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets: expected a non-empty sequence of module-name suffixes, got {targets!r}")
    return tuple(targets)


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)
