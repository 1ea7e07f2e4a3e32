"""The thin SDXL layer: put specops adapters on the hot path of a diffusers UNet and CLIP encoders.

    specops.sdxl.model    tiny_unet / tiny_text_encoders (random-init models with SDXL-base's exact
                          structure, built offline), encode_prompt, synthetic_batch, noised, with_prompt, attention_linears,
                          UNET_TARGETS / TEXT_TARGETS
    specops.sdxl.injection  inject (LyCORIS presets, optionally block-wise), set_block_weights, remove, fuse,
                          unfuse, apply_lora, INJECT_METHODS, PRESETS, BLOCK_LISTS
    specops.sdxl.textual_inversion  add_tokens, token_parameters, save_/load_textual_inversion (diffusers'
                          SDXL file; A1111's read), merge_tokens: new tokens in both CLIP encoders
    specops.sdxl.cut_mix  SVDiff's Cut-Mix-Unmix: cut_mix, cut_mix_prompt, unmix_loss, UnmixRecorder
    specops.sdxl.control  controlnet, t2i_adapter, ControlledUNet: ControlNet / T2I-Adapter residuals in the
                          training step (Control-LoRA: inject into the ControlNet)
    specops.sdxl.train    denoising_loss, train_step (prior preservation), train_blocks, param_groups /
                          ParamGroups, train_zip_mergers
                          (ZipLoRA: train the column mergers of two frozen LoRAs)

Every public name of these modules is re-exported here (specops.sdxl.inject(...) works). Adapter and
LoRA files are specops.lora_io's (save_adapters, load_adapters, export_lora, load_lora).
Real SDXL weights load into the same structure (UNet2DConditionModel.from_pretrained) when a user
has them; nothing here downloads anything, and diffusers / transformers are imported only when a
tiny model is built.
"""
from .control import ControlledUNet, controlnet, t2i_adapter
from .cut_mix import UnmixRecorder, cut_mix, cut_mix_prompt, unmix_loss
from .injection import BLOCK_LISTS, INJECT_METHODS, PRESETS, apply_lora, fuse, inject, remove, set_block_weights, unfuse
from .model import (TEXT_TARGETS, UNET_TARGETS, attention_linears, encode_prompt, noised, synthetic_batch, tiny_text_encoders,
                    tiny_unet, with_prompt)
from .textual_inversion import add_tokens, load_textual_inversion, merge_tokens, save_textual_inversion, token_parameters
from .train import ParamGroups, denoising_loss, param_groups, train_blocks, train_step, train_zip_mergers

__all__ = [
    "UNET_TARGETS", "TEXT_TARGETS", "tiny_unet", "tiny_text_encoders", "attention_linears", "encode_prompt",
    "synthetic_batch", "noised", "with_prompt", "INJECT_METHODS", "PRESETS", "BLOCK_LISTS", "inject", "set_block_weights", "remove", "fuse", "unfuse", "apply_lora", "denoising_loss",
    "train_step", "train_blocks", "add_tokens", "token_parameters", "save_textual_inversion",
    "load_textual_inversion", "merge_tokens", "cut_mix", "cut_mix_prompt", "unmix_loss", "UnmixRecorder",
    "controlnet", "t2i_adapter", "ControlledUNet", "ParamGroups", "param_groups", "train_zip_mergers",
]
