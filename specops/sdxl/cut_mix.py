"""SVDiff's Cut-Mix-Unmix: two subjects side by side in one image, and the regulariser that keeps each
subject token's cross-attention on its own half.

    cut_mix(first, second)              images (B, C, H, W): the centre half-width strip of `first` on the
                                        left, of `second` on the right (latents work the same way)
    cut_mix_prompt(first, second)       "<first> on the left, <second> on the right"
    unmix_loss(probs, tokens, width)    the unmix term of one layer's attention probabilities
    UnmixRecorder(unet, tokens, size)   records, in every cross-attention layer, only the columns of the
                                        subject tokens; .loss() is unmix_loss's mean over the layers

The unmix term, for attention probabilities P (N, h·w, K) over a feature map of width w (queries in
row-major order) and subject token sets T1 (left) and T2 (right):

    L = mean_{n, q ∈ right, k ∈ T1} P[n, q, k]² + mean_{n, q ∈ left, k ∈ T2} P[n, q, k]²

zero exactly when each subject's attention lies on its own half. The left half is the columns
x < w/2 (an odd middle column belongs to the right, as cut_mix's strips do).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["cut_mix", "cut_mix_prompt", "unmix_loss", "UnmixRecorder"]


def cut_mix(first: Tensor, second: Tensor) -> Tensor:
    """(B, C, H, W) x 2 -> (B, C, H, W): the centre strips of width W//2 of `first` (left) and
    W - W//2 of `second` (right), side by side: each subject, centred in its own image, keeps its
    middle and lands on its own half."""
    if first.shape != second.shape or first.dim() != 4:
        raise ValueError(f"cut_mix: expected two (B, C, H, W) tensors of one shape, got {tuple(first.shape)} "
                         f"and {tuple(second.shape)}")
    W = first.shape[-1]
    left, right = W // 2, W - W // 2

    def strip(x, width):
        start = (W - width) // 2
        return x[..., start:start + width]

    return torch.cat([strip(first, left), strip(second, right)], dim=-1)


def cut_mix_prompt(first: str, second: str) -> str:
    """The composed prompt, e.g. cut_mix_prompt("a [V1] dog", "a [V2] cat")."""
    return f"{first} on the left, {second} on the right"


def _halves(queries: int, width: int, device) -> tuple[Tensor, Tensor]:
    if width < 1 or queries % width:
        raise ValueError(f"unmix_loss: {queries} queries are not rows of width {width}")
    left = torch.arange(queries, device=device) % width < width // 2
    return left, ~left


def unmix_loss(probs: Tensor, tokens: tuple[Sequence[int], Sequence[int]], width: int) -> Tensor:
    """The unmix term (module docstring) of attention probabilities `probs` (N, h·w, K) over a
    feature map of width `width`; tokens = (T1, T2), index lists into K."""
    if probs.dim() != 3:
        raise ValueError(f"unmix_loss: expected probs (N, h*w, K), got {tuple(probs.shape)}")
    t1, t2 = (list(t) for t in tokens)
    if not t1 or not t2:
        raise ValueError("unmix_loss: each subject needs at least one token")
    left, right = _halves(probs.shape[1], width, probs.device)
    return probs[:, right][..., t1].square().mean() + probs[:, left][..., t2].square().mean()


class _Processor:
    """Cross-attention with the probabilities written out (SDPA does not return them): the same
    output as diffusers' processor, and the subject tokens' columns kept for the unmix term."""

    def __init__(self, recorder: "UnmixRecorder", name: str):
        self.recorder, self.name = recorder, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or attn.spatial_norm is not None \
                or attn.group_norm is not None or attn.residual_connection or hidden_states.dim() != 3:
            raise ValueError(f"UnmixRecorder: {self.name} is not a plain cross-attention layer")
        B, Q, _ = hidden_states.shape
        h = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = q.shape[-1] // h
        q, k, v = (t.view(B, -1, h, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # (B, h, Q, K)
        self.recorder._record(probs.reshape(B * h, Q, -1)[..., self.recorder._columns])
        out = (probs @ v).transpose(1, 2).reshape(B, Q, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class UnmixRecorder:
    """Installs a recording processor on every cross-attention layer (diffusers' attn2) of `unet`.

    tokens: (T1, T2), the prompt positions of subject 1 (left) and 2 (right); size: the latent's
    (H, W), from which each layer's feature-map width follows. Each forward replaces the recorded
    maps; loss() is the mean of unmix_loss over the layers. remove() restores the
    original processors. Only the subject columns are kept: (B·heads, h·w, |T1| + |T2|) per layer.
    """

    def __init__(self, unet: nn.Module, tokens: tuple[Sequence[int], Sequence[int]], size: tuple[int, int]):
        t1, t2 = (list(t) for t in tokens)
        if not t1 or not t2 or set(t1) & set(t2):
            raise ValueError(f"UnmixRecorder: two disjoint, non-empty token sets expected, got {tokens}")
        self._columns = t1 + t2
        self._split = len(t1)
        self.size = tuple(size)
        self.maps: list[Tensor] = []
        self._unet = unet
        self._saved = dict(unet.attn_processors)
        procs = {n: (_Processor(self, n) if ".attn2." in n else p) for n, p in self._saved.items()}
        self._layers = sum(".attn2." in n for n in procs)
        if not self._layers:
            raise ValueError("UnmixRecorder: the UNet has no cross-attention (attn2) layers")
        unet.set_attn_processor(procs)  # (empties procs)

    def _record(self, cols: Tensor) -> None:
        if len(self.maps) >= self._layers:  # a new forward
            self.maps = []
        self.maps.append(cols)

    def _width(self, queries: int) -> int:
        H, W = self.size
        scale = round((H * W / queries) ** 0.5)
        return W // scale

    def loss(self) -> Tensor:
        if not self.maps:
            raise RuntimeError("UnmixRecorder.loss: run the UNet forward first")
        t1, t2 = range(self._split), range(self._split, len(self._columns))
        return torch.stack([unmix_loss(m, (t1, t2), self._width(m.shape[1])) for m in self.maps]).mean()

    def remove(self) -> None:
        self._unet.set_attn_processor(self._saved)
        self.maps = []

