"""ControlNet and T2I-Adapter conditioning in the training step of an adapted UNet.

    controlnet(unet)            diffusers' ControlNetModel.from_unet (SDXL's text-time embedding kept)
    t2i_adapter(unet)           a diffusers T2IAdapter ("full_adapter_xl") sized for `unet`'s blocks
    ControlledUNet(unet, controlnet=..., adapter=..., scale=1.0)
                                a module whose forward(**unet_kwargs, control_image=...) adds the
                                conditioning residuals and runs the UNet: denoising_loss / train_step
                                take it as the model, with "control_image" in the batch's "unet" kwargs

The residuals are diffusers' own: a ControlNet's down/mid residuals, scaled by `scale`
(down_block_additional_residuals, mid_block_additional_residual), or a T2I-Adapter's features times
`scale` (down_intrablock_additional_residuals). specops adapters go into either network with
inject (Control-LoRA: inject(controlnet, "lora", preset="full"), then set requires_grad on the
other weights to train; export_lora({"controlnet": controlnet}, path) writes the diffusers file).
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["controlnet", "t2i_adapter", "ControlledUNet"]


def controlnet(unet: nn.Module, conditioning_channels: int = 3) -> nn.Module:
    """A ControlNet copied from `unet`'s encoder half (diffusers' from_unet: weights shared in value)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)


def t2i_adapter(unet: nn.Module, in_channels: int = 3, num_res_blocks: int = 2) -> nn.Module:
    """A full_adapter_xl T2IAdapter whose features match `unet`'s down blocks and mid block for a
    conditioning image of the latent's size times the VAE factor (8): its four features have the
    channels of blocks 0, 1, 2 and the mid block, at the sizes those blocks add them."""
    from diffusers import T2IAdapter

    ch = list(unet.config.block_out_channels)
    if len(ch) != 3:
        raise ValueError(f"t2i_adapter: full_adapter_xl needs SDXL's three UNet levels, got {len(ch)}")
    return T2IAdapter(in_channels=in_channels, channels=[*ch, ch[-1]], num_res_blocks=num_res_blocks,
                      downscale_factor=16, adapter_type="full_adapter_xl")


class ControlledUNet(nn.Module):
    """unet(x_t, t, c, ...) with a ControlNet's or a T2I-Adapter's residuals for `control_image`."""

    def __init__(self, unet: nn.Module, *, controlnet: nn.Module | None = None, adapter: nn.Module | None = None,
                 scale: float = 1.0):
        super().__init__()
        if (controlnet is None) == (adapter is None):
            raise ValueError("ControlledUNet: give exactly one of controlnet= and adapter=")
        self.unet, self.controlnet, self.adapter, self.scale = unet, controlnet, adapter, float(scale)

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, *, control_image: Tensor, **kwargs):
        if self.controlnet is not None:
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=control_image,
                                        conditioning_scale=self.scale, added_cond_kwargs=kwargs.get("added_cond_kwargs"),
                                        return_dict=False)
            return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, **kwargs)
        features = [f * self.scale for f in self.adapter(control_image)]
        return self.unet(sample, timestep, encoder_hidden_states, down_intrablock_additional_residuals=features,
                         **kwargs)
