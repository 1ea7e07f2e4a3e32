"""Run an existing LyCORIS network's LoCon, LoKr, LoHa, diag-OFT and BOFT modules through specops ops, in place.

    network = create_lycoris(model, ...); network.apply_to()
    report = apply(network)    # network: a LycorisNetwork (or any nn.Module holding LyCORIS modules)
    ...                        # train / infer / save_weights exactly as before
    revert(network)            # LyCORIS's own forward again

LyCORIS's apply_to() points the adapted layer's `forward` at the LyCORIS module's bound forward.
apply() gives each covered LyCORIS module an instance attribute `forward` (a callable bound to it)
and points the adapted layer's `forward` at that callable. It computes the same function as
LyCORIS's forward from the module's own parameters, read at every call: nothing is copied, so
state_dict, save_weights files and optimizers holding the parameters are unchanged and gradients
land on the same tensors. revert() deletes the attribute and points the layer back at LyCORIS's
bound forward. apply() twice is idempotent.

With m the network multiplier (module.multiplier), s = module.scale (alpha / rank, or / sqrt(rank)
with rs_lora), σ = module.scalar (1, or a trained scalar with use_scalar), W0 and b the layer's
weight and bias, c = m σ s:

    LyCORIS module    LyCORIS computes                      patched forward
    LoCon, Linear     base(x) + x (c up down)^T              lora_linear(x, W0, b, down, c·1, up): no ΔW
    LoCon, Conv2d     base(x) + conv(x, c up down)           base(x) + c up * (down * x): the 1x1 up one batched
                      (Tucker: up mid down)                  GEMM onto base(x) (Tucker: down 1x1, then mid)
    LoKr, Linear      base(x) + x (c W1 ⊗ W2)^T              GEMMs over x viewed (rows, n1, n2), no ΔW
    LoKr, Conv2d      base(x) + conv(x, c W1 ⊗ W2)           training: base(x) + the ΔW conv factored (below);
                                                             else conv(x, W0 + c W1 ⊗ W2, b): one conv
    LoHa, Linear      base(x) + x (c ΔH)^T                   base(x) + lowrank_linear of ΔH = C D, its rank-r²
                                                             factors, where the FLOPs favour it (below); else
                                                             F.linear(x, W0 + c ΔH, b): one GEMM
    LoHa, Conv2d      base(x) + conv(x, c ΔH)                the same, C D as LoCon of rank r² where the FLOPs
                                                             favour it; else conv(x, W0 + c ΔH, b): one conv
    diag-OFT, Linear  base(x) + x (W' - W0)^T                F.linear(x, W', b): one GEMM; training (W0
                                                             frozen): the blocks on W0 x, no dense dW
    diag-OFT, Conv2d  base(x) + conv(x, W' - W0)             conv(x, W', b): one conv
    BOFT, Linear      base(x) + x (W' - W0)^T                F.linear(x, W', b): one GEMM; training (W0
                                                             frozen, few stages): the stages on W0 x
    BOFT, Conv2d      base(x) + conv(x, W' - W0)             conv(x, W', b): one conv
    LoKr / LoHa with dora_wd (not in bypass_mode): one GEMM / conv with LyCORIS's decomposed weight
    (_dora's docstring).

LoKr's W1 is lokr_w1 or lokr_w1_a @ lokr_w1_b, W2 is lokr_w2, lokr_w2_a @ lokr_w2_b, or (Tucker
conv) W2[p, q, h, w] = Σ_{i,j} lokr_t2[i, j, h, w] lokr_w2_a[i, p] lokr_w2_b[j, q]; on a conv the
kernel window rides on W2. LoHa's ΔH = (hada_w1_a hada_w1_b) ⊙ (hada_w2_a hada_w2_b) in the weight's
shape (Tucker: each half Σ_{i,j} t[i, j, h, w] w_a[i, o] w_b[j, c]). LyCORIS adds its ΔW term as
conv(x, (W0 + c ΔW) - W0), which differs from the above by rounding only. The same holds for LoKr
and LoHa in bypass_mode, where LyCORIS computes base(x) + drop(x-side ΔW term): with dropout off
(or in eval) it is the same value. LoKr's Linear never forms the (out, in) ΔW, nor does a LoKr conv
that trains where the FLOPs favour it (specops.adapters._kron_conv_factored: the input's channel
groups convolved with W2, then mixed by W1, with no dense weight gradient); the fused layers save
LyCORIS's second GEMM / conv in the forward and its extra ones in the backward, and LoHa's two
halves are rebuilt in the backward rather than kept (specops.adapters.hadamard_delta). A LoHa (not
Tucker) is the rank-r² LoRA C D (C's rows hada_w1_a[o] ⊗ hada_w2_a[o], D's columns hada_w1_b[:, i] ⊗
hada_w2_b[:, i]: specops.adapters.hadamard_factors), added as one lowrank_linear pass (a conv: D's
conv, C's 1x1) with no weight-sized tensor and no dense weight gradient where specops.adapters.hadamard_factored's FLOP
count favours it (rank 8 on SDXL's widths).

diag-OFT (oft_blocks B of shape (k, p, p), k p = out, rescale g, constraint κ = alpha): LyCORIS's
R_i = (I + q_i)(I - q_i)^-1, q = B - B^T (scaled by κ out / (||q|| + 1e-8) once ||q|| passes κ out),
acts on W0's rows block by block as R_i^T = cayley(-2 q_i) (specops' exact Cayley, the
correspondence Q = -2 B of specops.adapters.OFT), so W' = diag(g) blockdiag(m R_i^T + (1 - m) I) W0.
LyCORIS's base weight is not detached inside W', so W0's gradient gets base(x)'s term on top of
W''s; the patched forward adds W0 - W0.detach() (zero) to W' to give the same gradient. LyCORIS's
bypass_mode diag-OFT rotates base(x), bias included: another function, left to LyCORIS.

BOFT (oft_blocks B of shape (s, k, b, b), s butterfly stages of k blocks, k b = out): stage i's
blocks are m cayley(2 q_i) + (1 - m) I, q = B - B^T under diag-OFT's bound, placed by LyCORIS's
butterfly permutation of stage i; R = B_{s-1} ⋯ B_0 acts on W0's rows (specops.adapters.butterfly:
s gathers and s batched (b, b) GEMMs on W0, never an out x out matrix), W' = diag(g) R W0. The
default mode adds W0 - W0.detach() as diag-OFT does; bypass_mode rotates base(x) including the
bias, which is the single layer call with W' and bias diag(g) R b.

The patched forward hands the call to LyCORIS's own forward whenever it would not compute the same
thing: extra forward arguments, training mode with dropout, rank_dropout or module_dropout > 0
(random masks and LyCORIS's torch.rand draws: listed in report["notes"]), and dtypes that differ
between the input, the layer's weight and the adapter parameters. Under torch.autocast the patched
paths run (F.linear / conv cast as usual, LoKr's factors cast to the autocast dtype); they
round differently from LyCORIS's own mix of autocast and float32 ops, to the autocast dtype's
precision.

LyCORIS's default-mode LoCon forms ΔW = c up down, runs a second dense GEMM / conv with it and, in the
backward, a dense weight gradient; the patched LoCon never forms ΔW (its conv geometry is the layer's,
or in bypass_mode the down / mid conv's own, as LyCORIS's bypass has it).

Not covered, left on LyCORIS's path and listed in report["skipped"] with the reason: every other
LyCORIS module type (GLoRA, full, norms, ...), these five on Conv1d / Conv3d, LoCon with dora_wd
or on a grouped conv, dora_wd in bypass_mode (where LyCORIS leaves the decomposition out), diag-OFT in bypass_mode,
quantized / fp8 / PEFT-wrapped / non-plain base layers, base layers with forward hooks or
padding_mode other than zeros, and modules whose layer does not call them directly (apply_to() not
run, or another wrapper stacked on top).

Supported LyCORIS versions: SUPPORTED_LYCORIS (lycoris-lora 4.1.x, whose module attributes this
module reads). Any other version warns and leaves the network untouched.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _registry
from ..adapters import (BUTTERFLY_ROWS_MAX_STAGES, _add_kron_linear, _add_up_projection, _conv_geometry, _kron_w2,
                        _plain_conv, _plain_linear, add_hadamard, butterfly, butterfly_gathers, butterfly_rows,
                        kron_conv_onto, lowrank_conv_onto, lowrank_onto)
from ..kron import block_diag_matmul
from ..stiefel import cayley
from ._patch import PatchedForward, is_patched, loha_delta, loha_factored, lokr_conv_factored, lokr_w2_parts, patch, refused

__all__ = ["apply", "revert", "SUPPORTED_LYCORIS"]

SUPPORTED_LYCORIS = ((4, 1), (4, 2))  # [min, max): the lycoris-lora versions whose module internals this reads


def _installed_version() -> str:
    from importlib.metadata import version

    return version("lycoris-lora")


# ----------------------------------------------------------------------------- the patched forwards


def _coef(mod, m: float) -> Tensor:
    """c = m σ s: the multiplier m, the (possibly trained) scalar and alpha / rank, as one factor."""
    return mod.scalar * (m * mod.scale)


def _lokr_parts(mod) -> tuple[Tensor, tuple]:
    """LoKr's W1 and its W2 as _patch.lokr_w2_parts."""
    W1 = mod.lokr_w1 if mod.use_w1 else mod.lokr_w1_a @ mod.lokr_w1_b
    if mod.use_w2:
        return W1, lokr_w2_parts(mod.lokr_w2, None, None, None)
    return W1, lokr_w2_parts(None, mod.lokr_w2_a, mod.lokr_w2_b, mod.lokr_t2 if mod.tucker else None)


def _lokr_factors(mod) -> tuple[Tensor, Tensor]:
    """LoKr's (W1, W2), W2 (b, d) on a Linear, (b, d, kh, kw) on a conv (the kernel rides on W2)."""
    W1, parts = _lokr_parts(mod)
    W2 = _kron_w2(parts)
    if mod.module_type == "conv2d":
        W2 = W2.reshape(W2.shape[0], -1, *mod.shape[2:])
    return W1, W2


def _lokr_linear(mod, x: Tensor) -> Tensor:
    """y = base(x) + x (c W1 ⊗ W2)^T, as specops's LoKr adapter computes it (specops.adapters._add_kron_linear, no ΔW).
    Under torch.autocast the inputs are cast to the autocast dtype, as F.linear would cast them."""
    W1, W2 = _lokr_parts(mod)
    xa, W1 = x, W1 * _coef(mod, mod.multiplier)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        xa, W1, W2 = xa.to(dtype), W1.to(dtype), tuple(t.to(dtype) for t in W2)
    y = mod.org_forward(x)
    into = _plain_linear(mod.org_module[0], x, W1) and _registry._eager()  # into the base's own output
    return _add_kron_linear(y.to(torch.promote_types(y.dtype, xa.dtype)), xa, W1, W2, into=into)


def _lokr_delta(mod, m: float) -> Tensor:
    """c W1 ⊗ W2 in the layer weight's shape (c with multiplier m)."""
    W1, W2 = _lokr_factors(mod)
    W1 = W1 * _coef(mod, m)
    if mod.module_type == "conv2d":
        return torch.kron(W1[:, :, None, None], W2.contiguous())
    return torch.kron(W1, W2)


def _loha_delta(mod, m: float) -> Tensor:
    """c ΔH in the layer weight's shape (c with multiplier m)."""
    t = (mod.hada_t1, mod.hada_t2) if mod.tucker else (None, None)
    return loha_delta(mod.hada_w1_a, mod.hada_w1_b, mod.hada_w2_a, mod.hada_w2_b, *t, _coef(mod, m), mod.shape)


def _run_layer(layer, x: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    """The base layer's own op (F.linear, or F.conv2d with its geometry) with weight W and bias."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, W, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, W, bias)


def _fused(delta_fn):
    """The forward that runs the layer once with W0 + ΔW, ΔW = delta_fn(mod, multiplier)."""

    def run(mod, x: Tensor) -> Tensor:
        layer = mod.org_module[0]
        return _run_layer(layer, x, layer.weight + delta_fn(mod, mod.multiplier), layer.bias)

    return run


def _dora(delta_fn):
    """The weight-decomposed (dora_wd) forward, the layer run once with LyCORIS's W':

        V = sg(W0) + σ s ΔW,  n = ||V|| per output row (wd_on_out) or per input column, + eps,
        W' = V (m (dora_scale / n - 1) + 1)

    (sg: W0 detached, as LyCORIS's; the multiplier m acts on the rescale, not on ΔW). W0's gradient
    is base(x)'s alone in LyCORIS, which adds base(x) + x (W' - sg(W0))^T: the patched forward adds
    W0 - sg(W0) (zero) to W' for it."""

    def run(mod, x: Tensor) -> Tensor:
        layer = mod.org_module[0]
        W0 = layer.weight
        V = W0.detach() + delta_fn(mod, 1.0)
        if mod.wd_on_out:
            n = torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1).reshape(-1, *[1] * (V.dim() - 1))
        else:
            n = torch.linalg.vector_norm(V.transpose(0, 1).reshape(V.shape[1], -1), dim=1)
            n = n.reshape(1, -1, *[1] * (V.dim() - 2))
        scale = mod.dora_scale / (n + torch.finfo(V.dtype).eps)
        m = mod.multiplier
        if m != 1:
            scale = m * (scale - 1) + 1
        W = V * scale
        if W0.requires_grad:
            W = W + (W0 - W0.detach())
        return _run_layer(layer, x, W, layer.bias)

    return run


_loha_fused = _fused(_loha_delta)  # autograd keeps LoHa's factors, not its two halves
_lokr_fused = _fused(_lokr_delta)  # torch.kron keeps only the factors


def _loha(mod, x: Tensor) -> Tensor:
    """LoHa (not Tucker): added as its rank-r² product when the FLOPs favour it (_patch.loha_factored /
    adapters.add_hadamard: no weight-sized tensor), otherwise merged into one Linear or conv (_loha_fused)."""
    layer = mod.org_module[0]
    if not mod.tucker and loha_factored(layer, x, mod.hada_w1_a, any(p.requires_grad for p in mod.parameters())):
        return add_hadamard(layer, x, mod.hada_w1_a, mod.hada_w1_b, mod.hada_w2_a, mod.hada_w2_b,
                            _coef(mod, mod.multiplier), run=mod.org_forward)
    return _loha_fused(mod, x)


def _lokr_conv(mod, x: Tensor) -> Tensor:
    """LoKr on a conv: added factored, ΔW never formed, when it trains and the FLOPs favour it
    (_patch.lokr_conv_factored); otherwise merged into one conv (_lokr_fused)."""
    W1, parts = _lokr_parts(mod)
    layer = mod.org_module[0]
    if lokr_conv_factored(layer, x, W1, parts, any(p.requires_grad for p in mod.parameters())):
        return kron_conv_onto(layer, x, W1 * _coef(mod, mod.multiplier), parts, run=mod.org_forward)
    return _lokr_fused(mod, x)
_loha_dora = _dora(_loha_delta)
_lokr_dora = _dora(_lokr_delta)


def _oft_blocks(mod) -> Tensor:
    """diag-OFT's row blocks m R_i^T + (1 - m) I, R_i^T = cayley(-2 q_i) with q = oft_blocks - oft_blocks^T
    (module docstring)."""
    q = mod.oft_blocks - mod.oft_blocks.mT
    if mod.constraint > 0:  # LyCORIS's bound: q <- q κd / (||q|| + 1e-8) once that norm passes κd
        q = q * (mod.constraint / torch.clamp(torch.linalg.vector_norm(q) + 1e-8, min=mod.constraint))
    Rt = cayley(-2.0 * q)
    m = mod.multiplier
    if m != 1:
        Rt = m * Rt + (1 - m) * torch.eye(Rt.shape[-1], dtype=Rt.dtype, device=Rt.device)
    return Rt


def _oft_weight(mod) -> Tensor:
    """diag-OFT's adapted weight W' = diag(g) blockdiag(_oft_blocks) W0."""
    Rt = _oft_blocks(mod)
    W0 = mod.org_module[0].weight
    W = torch.einsum("kij,kjc->kic", Rt, W0.reshape(*Rt.shape[:2], -1)).reshape(W0.shape)
    if mod.rescaled:
        W = mod.rescale * W
    if W0.requires_grad:  # LyCORIS subtracts a detached W0 from W' and adds base(x): W0's gradient counts twice
        W = W + (W0 - W0.detach())
    return W


def _oft_fused(mod, x: Tensor) -> Tensor:
    """y = layer(x) run once with W' (_oft_weight) in place of W0; while a Linear's blocks train (W0
    frozen), y = diag(g) blockdiag(_oft_blocks) (W0 x) + b instead: the same function with the blocks on
    the output's features, so the backward has no dense weight gradient (rows · out · p FLOPs per
    rotation against rows · out · in for that gradient)."""
    layer = mod.org_module[0]
    if isinstance(layer, nn.Linear) and not layer.weight.requires_grad and torch.is_grad_enabled() \
            and mod.oft_blocks.requires_grad:
        Rt = _oft_blocks(mod)
        y = F.linear(x, layer.weight)
        y = block_diag_matmul(y, Rt.mT.to(y.dtype))
        if mod.rescaled:
            y = y * mod.rescale.view(-1).to(y.dtype)
        return y if layer.bias is None else y + layer.bias
    return _run_layer(layer, x, _oft_weight(mod), layer.bias)


def _boft_fused(mod, x: Tensor) -> Tensor:
    """BOFT: the layer run once with W' = diag(g) R W0 (bias b; in bypass_mode, which rotates base(x) bias
    included, diag(g) R b), R = B_{k-1} ⋯ B_0 applied to W0's rows stage by stage (specops.adapters.butterfly
    with LyCORIS's butterfly gathers); stage blocks m cayley(2 q_i) + (1 - m) I (module docstring). While a
    Linear's blocks train (W0 frozen), diag(g) R (W0 x) + b instead: the stages on the output's features
    (specops.adapters.butterfly_rows, up to BUTTERFLY_ROWS_MAX_STAGES stages), so the backward has no dense
    weight gradient."""
    q = mod.oft_blocks - mod.oft_blocks.mT
    if mod.constraint > 0:  # LyCORIS's bound, as diag-OFT's
        q = q * (mod.constraint / torch.clamp(torch.linalg.vector_norm(q) + 1e-8, min=mod.constraint))
    blocks = cayley(2.0 * q.flatten(0, 1)).view(q.shape)
    m = mod.multiplier
    if m != 1:  # LyCORIS interpolates every stage toward the identity
        blocks = m * blocks + (1 - m) * torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    layer = mod.org_module[0]
    W0, bias = layer.weight, layer.bias
    k, D, b, _ = blocks.shape
    gathers = butterfly_gathers(D * b, b, k, W0.device)
    if mod.bypass_mode and bias is not None:
        bias = butterfly(bias, blocks, gathers)
        if mod.rescaled:
            bias = mod.rescale.view(-1) * bias
    if isinstance(layer, nn.Linear) and not W0.requires_grad and torch.is_grad_enabled() \
            and mod.oft_blocks.requires_grad and k <= BUTTERFLY_ROWS_MAX_STAGES:  # as _oft_fused: on W0 x
        y = butterfly_rows(F.linear(x, W0), blocks.to(x.dtype), gathers)
        if mod.rescaled:
            y = y * mod.rescale.view(-1).to(y.dtype)
        return y if bias is None else y + bias
    W = butterfly(W0, blocks, gathers)
    if mod.rescaled:
        W = mod.rescale * W
    if W0.requires_grad and not mod.bypass_mode:  # as _oft_weight: LyCORIS's default mode counts W0's gradient twice
        W = W + (W0 - W0.detach())
    return _run_layer(layer, x, W, bias)


def _locon_linear(mod, x: Tensor) -> Tensor:
    """y = base(x) + x (c up down)^T, c the diagonal, ΔW never formed: one lora_linear op with the original
    Linear's weight where specops.adapters.lowrank_onto can, else lowrank_linear onto its forward."""
    A, B = mod.lora_down.weight, mod.lora_up.weight
    c = _coef(mod, mod.multiplier).to(A.dtype).expand(A.shape[0])
    return lowrank_onto(mod.org_module[0], x, A, c, B, run=mod.org_forward)


def _locon_conv(mod, x: Tensor) -> Tensor:
    """y = base(x) + c up * (down * x) (Tucker: up * (mid * (down * x)), down 1x1): the down conv with
    the layer's geometry (bypass_mode: its own conv's, as LyCORIS's bypass), the 1x1 up-projection one
    batched GEMM onto base(x) (specops.adapters._add_up_projection), through specops.adapters.lowrank_conv_onto
    without the core and with the base's geometry; ΔW never formed in the forward."""
    layer = mod.org_module[0]
    down, B = mod.lora_down.weight, mod.lora_up.weight
    src = (mod.lora_mid if mod.tucker else mod.lora_down) if mod.bypass_mode else layer  # whose geometry LyCORIS uses
    geometry = (src.stride, src.padding, src.dilation)
    B = B.flatten(1) * _coef(mod, mod.multiplier)
    if not mod.tucker and geometry == _conv_geometry(layer) and _plain_conv(layer, x, B):
        return lowrank_conv_onto(layer, x, down, B, run=mod.org_forward)
    if mod.tucker:
        h = F.conv2d(F.conv2d(x, down), mod.lora_mid.weight, None, *geometry)
    else:
        h = F.conv2d(x, down, None, *geometry)
    y = mod.org_forward(x)
    if torch.is_autocast_enabled(x.device.type):
        h, B = h.to(torch.get_autocast_dtype(x.device.type)), B.to(torch.get_autocast_dtype(x.device.type))
    with torch.autocast(x.device.type, enabled=False):
        return _add_up_projection(y.to(h.dtype), B, h)


@functools.cache
def _table() -> dict[tuple[type, str], tuple]:
    """(LyCORIS module class, module_type) -> (patched computation, whether it fuses into the weight,
    the computation with dora_wd or None)."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    return {
        (LoConModule, "linear"): (_locon_linear, False, None),
        (LoConModule, "conv2d"): (_locon_conv, False, None),
        (LokrModule, "linear"): (_lokr_linear, False, _lokr_dora),
        (LokrModule, "conv2d"): (_lokr_conv, True, _lokr_dora),
        (LohaModule, "linear"): (_loha, True, _loha_dora),
        (LohaModule, "conv2d"): (_loha, True, _loha_dora),
        (DiagOFTModule, "linear"): (_oft_fused, True, None),
        (DiagOFTModule, "conv2d"): (_oft_fused, True, None),
        (ButterflyOFTModule, "linear"): (_boft_fused, True, None),
        (ButterflyOFTModule, "conv2d"): (_boft_fused, True, None),
    }


def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """The patched forward (module docstring); LyCORIS's own forward where it would differ."""
    own = type(self).forward
    if args or kwargs:
        return own(self, x, *args, **kwargs)
    if self.training and _draws_masks(self):
        return own(self, x)
    dtypes = {x.dtype, self.org_module[0].weight.dtype}
    dtypes.update(p.dtype for p in self.parameters())
    if len(dtypes) > 1:
        return own(self, x)
    run, _, dora = _table()[type(self), self.module_type]
    return (dora if getattr(self, "wd", False) else run)(self, x)




def _draws_masks(mod) -> bool:
    """Whether the module draws random masks in training mode (LoCon keeps its dropout as a module)."""
    dropout = getattr(mod.dropout, "p", 0.0) if isinstance(mod.dropout, nn.Module) else mod.dropout
    return bool(dropout or mod.rank_dropout or mod.module_dropout)


def _calls_own_forward(f, module: nn.Module) -> bool:
    """f is `module`'s class forward bound to it (what apply_to() stores), not some other callable."""
    return getattr(f, "__self__", None) is module and getattr(f, "__func__", None) is type(module).forward


# ----------------------------------------------------------------------------- apply / revert


def _why_not(mod, table) -> str | None:
    """Why this LyCORIS module stays on LyCORIS's path, or None when it can be patched."""
    cls = type(mod)
    if (cls, mod.module_type) not in table:
        if any(c is cls for c, _ in table):
            return f"{cls.__name__} on a {mod.module_type} layer: no specops path (Linear and Conv2d are covered)"
        return f"{cls.__module__}.{cls.__qualname__}: no specops path for this module type"
    wd = getattr(mod, "wd", False)
    if wd and table[cls, mod.module_type][2] is None:
        return f"dora_wd on {cls.__name__}: not covered"
    if wd and mod.bypass_mode:
        return "dora_wd in bypass_mode: LyCORIS's bypass forward leaves the weight decomposition out, not covered"
    if cls.__name__ == "DiagOFTModule" and mod.bypass_mode:
        return "diag-OFT in bypass_mode rotates the layer's output, bias included: a different function, not covered"
    if "forward" in mod.__dict__:
        return "its forward is already replaced on the instance"
    layer = mod.org_module[0]
    if mod.peft_wrapper is not None or mod.is_quant:
        return "quantized, fp8 or PEFT-wrapped base layer"
    if not _calls_own_forward(layer.__dict__.get("forward"), mod):
        return "its layer does not call it directly (network.apply_to() not run, or another wrapper on top)"
    kind = nn.Conv2d if mod.module_type == "conv2d" else nn.Linear
    if type(layer) is not kind:
        return f"base layer is a {type(layer).__name__}, not a plain {kind.__name__}"
    if kind is nn.Conv2d and layer.groups != 1 and not table[cls, mod.module_type][1]:
        return f"grouped conv (groups={layer.groups}): the factored path convolves with all input channels"
    if table[cls, mod.module_type][1] or wd:
        if not _calls_own_forward(mod.org_forward, layer):
            return "its base forward is not the layer's own (stacked LyCORIS modules); the fused path runs the weight"
        if layer._forward_hooks or layer._forward_pre_hooks:
            return "base layer has forward hooks, which the fused path would not run"
        if kind is nn.Conv2d and layer.padding_mode != "zeros":
            return (f"conv padding_mode={layer.padding_mode!r}: LyCORIS pads ΔW's conv with zeros, "
                    "the base's differently")
    return None


def _lycoris_modules(network: nn.Module):
    from lycoris.modules.base import LycorisBaseModule

    seen = set()
    # a LycorisNetwork registers its modules as submodules only in apply_to(); network.loras has them all
    found = [*network.named_modules(), *(("", m) for m in getattr(network, "loras", ()))]
    for name, m in found:
        if isinstance(m, LycorisBaseModule) and id(m) not in seen:
            seen.add(id(m))
            yield getattr(m, "lora_name", None) or name, m


def apply(network: nn.Module) -> dict:
    """Patch every covered LyCORIS module of `network` in place (module docstring). Idempotent.

    Returns {"patched": [names], "skipped": {name: why}, "notes": {name: note}} keyed by lora_name:
    the modules now on specops' path, those left on LyCORIS's with the reason, and patched modules
    that run LyCORIS's path in training mode (dropout). With a lycoris-lora version outside
    SUPPORTED_LYCORIS it warns, patches nothing and reports every module as skipped.
    """
    mods = list(_lycoris_modules(network))
    report = refused("lycoris-lora", _installed_version(), SUPPORTED_LYCORIS, [n for n, _ in mods],
                     "specops.integrations.lycoris.apply")
    if report is not None:
        return report
    table = _table()

    def install(mod):
        mod.forward = PatchedForward(_forward, mod)
        mod.org_module[0].forward = mod.forward
        if _draws_masks(mod):
            return "dropout, rank_dropout or module_dropout > 0: in training mode this module runs LyCORIS's forward"
        return None

    return patch(mods, lambda mod: _why_not(mod, table), install)


def revert(network: nn.Module) -> list[str]:
    """Undo apply(): every patched module runs LyCORIS's own forward again. Returns the reverted names."""
    names = []
    for name, mod in _lycoris_modules(network):
        if is_patched(mod):
            patched = mod.__dict__.pop("forward")
            layer = mod.org_module[0]
            if layer.__dict__.get("forward") is patched:
                layer.forward = mod.forward  # LyCORIS's bound forward, as apply_to() set it
            names.append(name)
    return names
