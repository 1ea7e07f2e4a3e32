"""Run an existing HF PEFT model's LoRA, LoKr, LoHa, OFT, BOFT and AdaLoRA layers through specops ops, in place.

    report = apply(model)    # model: a PeftModel, or any nn.Module with PEFT layers injected
    ...                      # train / infer / save exactly as before
    revert(model)            # PEFT's own forward again

apply() gives each covered PEFT layer an instance attribute `forward` (a callable bound to it) that
computes the same function as PEFT's forward from the layer's own parameters, read at every call:
nothing is copied or re-parametrised, so state_dict keys and values, save_pretrained files and
optimizers holding the parameters are unchanged, and gradients land on the same tensors. revert()
deletes the attribute, so the class's forward (PEFT's) runs again. apply() twice is idempotent;
adapters added later to patched layers are covered at once, layers made later need apply() again.
copy.deepcopy and torch.save / torch.load of the whole model keep the patch.

With s_a = layer.scaling[a] and the sum over the layer's active adapters a (PEFT's
active_adapters that exist on the layer), W0 and b the base weight and bias:

    PEFT layer      PEFT computes                         patched forward
    lokr.Linear     base(x) + Σ_a x (s_a W1 ⊗ W2)^T        GEMMs over x viewed (rows, n1, n2), no ΔW
    loha.Linear     base(x) + Σ_a x ΔW_a^T                 base(x) + Σ_a lowrank_linear of ΔW_a = C_a D_a, its
                                                          rank-r² factors, where the FLOPs favour it (below);
                                                          the other adapters merged: F.linear(x, W0 + Σ ΔW_a, b)
    lokr.Conv2d     base(x) + Σ_a conv(x, ΔW_a)            training: base(x) + Σ_a ΔW_a's conv factored; else one
                                                          conv(x, W0 + Σ_a ΔW_a, b) (below)
    loha.Conv2d     base(x) + Σ_a conv(x, ΔW_a)            the same, C_a D_a as LoCon of rank r² where the FLOPs
                                                          favour it; the others merged: conv(x, W0 + Σ ΔW_a, b)
    adalora         base(x) + Σ_a (x (A_a ⊙ E_a)ᵀ B_aᵀ)     base(x) + Σ_a lowrank_linear(x, A_a, c_a E_a, B_a),
      SVDLinear       · s_a / (ranknum_a + 1e-5)            c_a = s_a / (ranknum_a + 1e-5): one pass per adapter
                                                          (the first with the base as lora_linear, as LoRA's)
    lora.Linear     base(x) + Σ_a s_a x A_aᵀ B_aᵀ          the same: the first adapter and a plain nn.Linear base
                                                          as one lora_linear op, the others lowrank_linear
    lora.Conv2d     base(x) + Σ_a s_a B_a * (A_a * x)      the same, B_a's 1x1 conv one batched GEMM onto base(x)
    boft.Linear     base(x M) ⊙ s, M = Π_a M_a (n x n)      F.linear(x, diag(s) (M W0ᵀ)ᵀ, b): M applied to W0 stage
    boft.Conv2d     conv(x, diag(s) (M W0ᵀ)ᵀ)               by stage (specops.adapters.butterfly), never formed;
                                                          a Linear in-network (x requires grad, W0 frozen, few
                                                          stages): M applied to x, no dense weight gradient
    oft.Linear      base(x R_{a_1} ⋯ R_{a_k}), R_a block-     the same, each x R_a one block_diag_matmul pass; R_a
                    diagonal (einsum over (rows, r, b))       PEFT's function of its weight (_oft_blocks)

LoKr's W_i is the dense lokr_w_i or lokr_w_i_a @ lokr_w_i_b (on a Tucker conv, W2 is the core
lokr_t2 contracted with lokr_w2_a, lokr_w2_b); LoHa's ΔW = s (w1_a w1_b) ⊙ (w2_a w2_b) (Tucker:
each half a core contracted with its two factors). LoKr's Linear never forms the (out, in) ΔW (two
GEMMs over x viewed (rows, n1, n2), specops.adapters.LoKr's path); a LoKr conv adapter that trains
runs factored when the FLOPs favour it (specops.adapters._kron_conv_factored: the input's channel groups
convolved with W2, then mixed by W1; no ΔW and no dense weight gradient), the other adapters merged;
the fused layers save PEFT's second GEMM / conv in the forward and its extra ones in the backward. A LoHa
adapter (not Tucker) is the rank-r² LoRA C D (C's rows w1_a[o] ⊗ w2_a[o], D's columns w1_b[:, i] ⊗ w2_b[:, i]:
specops.adapters.hadamard_factors), added as one lowrank_linear pass (a conv: D's conv, C's 1x1) with no
weight-sized tensor and no dense weight gradient where specops.adapters.hadamard_factored's FLOP count favours it (rank 8 on SDXL's widths).
Activation memory is PEFT's or less on the Linear and merged paths: LoKr's Linear keeps no ΔW, the
fused layers keep the one W (LoHa's halves are rebuilt in the backward rather than kept:
specops.adapters.hadamard_delta); a factored LoKr conv keeps its per-group outputs (N·n1·(r + m2)·H'·W'
values for a batch of N, W2 of rank r) in place of ΔW.

The patched forward hands the call to PEFT's own forward whenever it would not compute the same
thing: adapters merged or disabled, extra forward arguments, module_dropout or rank_dropout > 0
(AdaLoRA: lora_dropout > 0) on an active adapter in training mode (random masks: PEFT's own path,
reported in report["notes"]),
and, for the fused layers, dtypes that differ between the input, the base weight and the adapters
outside torch.autocast (PEFT then adds results of two dtypes). In training mode it draws PEFT's
module-dropout number (torch.rand(1)) for every active adapter, as PEFT does even at dropout 0, so
the global RNG stream, and with it every later dropout mask, stays PEFT's. Input casting follows
PEFT (layer._cast_input_dtype; the output in the input's dtype for LoKr / LoHa, the base output's for LoRA
and AdaLoRA). Under torch.autocast,
LoKr's factors and input are cast to the autocast dtype, as F.linear would cast them.

Gradients are autograd's through the ops above, equal to PEFT's except on LoHa Tucker convs
(use_effective_conv2d): PEFT 0.21's hand-written backward there returns wrong gradients for
hada_w1_a and hada_w2_a (it reuses the other half's rebuild); the patched layer gives the true
ones and says so in report["notes"].

LoRA's and AdaLoRA's Linear run lora_linear (the base GEMM, then the update added into its output: one
(T, m) tensor, not PEFT's two) or lowrank_linear: one pass over x's rows forward and one over the output
gradient's backward, where PEFT's two nn.Linear calls are skinny GEMMs far below the machine's GEMM rate.
LoRA adapters that are variants (DoRA, aLoRA, ...: layer.lora_variant) or have a lora_B bias run PEFT's
forward while active (report["notes"]).

BOFT's M_a = B_{N-1} ⋯ B_0, B_i = P_i diag(cayley blocks) P_iᵀ with PEFT's boft_P permutations (the identity
when N = 1, which PEFT forces without its CUDA block-diagonal extension): PEFT builds every B_i and M as dense
n x n matrices (two n³ bmm per stage) and rotates x (rows·n² FLOPs); the patched path costs 2 N n b · out FLOPs
per adapter on W0 plus the one GEMM / conv, and its backward one weight-gradient GEMM in place of PEFT's dense
rotation gradients. boft_dropout > 0 in training mode runs PEFT's forward (random blocks).

Not covered, left on PEFT's path and listed in report["skipped"] with the reason: every other
tuner layer type (OFT's Conv2d, which rotates unfolded patches and folds them back; AdaLoRA's
SVDConv2d, Conv1d, quantized layers, ...), LoRA on a grouped conv, layers whose forward is already
replaced on the instance (e.g. accelerate hooks), nested tuner layers, fused layers whose base layer
is not a plain nn.Linear / nn.Conv2d, has hooks, or (conv) pads other than with zeros.

Supported PEFT versions: SUPPORTED_PEFT (0.21.x, whose layer attributes this module reads). Any
other version warns and leaves the model untouched.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.utils.weak import WeakTensorKeyDictionary

from .. import _registry
from ..adapters import (BUTTERFLY_ROWS_MAX_STAGES, EPS_RANKNUM, _add_kron_conv, _add_kron_linear, _add_up_projection,
                        _conv_geometry, _kron_w2, _plain_conv, _plain_linear, add_hadamard, add_lowrank, butterfly, butterfly_rows,
                        kron_conv_onto, lowrank_conv_onto, lowrank_onto)
from ..kron import block_diag_matmul
from ..stiefel import cayley, matrix_polynomial
from ._patch import PatchedForward, is_patched, loha_delta, loha_factored, lokr_conv_factored, lokr_w2_parts, patch, refused

__all__ = ["apply", "revert", "SUPPORTED_PEFT"]

SUPPORTED_PEFT = ((0, 21), (0, 22))  # [min, max): the PEFT versions whose layer internals this module reads


# ----------------------------------------------------------------------------- the patched forwards


def _lokr_parts(layer, a: str) -> tuple[Tensor, tuple]:
    """LoKr's W1 for adapter a and its W2 as _patch.lokr_w2_parts."""
    W1 = layer.lokr_w1[a] if a in layer.lokr_w1 else layer.lokr_w1_a[a] @ layer.lokr_w1_b[a]
    get = lambda d: d[a] if a in d else None  # noqa: E731
    return W1, lokr_w2_parts(get(layer.lokr_w2), get(layer.lokr_w2_a), get(layer.lokr_w2_b), get(layer.lokr_t2))


def _lokr_factors(layer, a: str) -> tuple[Tensor, Tensor]:
    """LoKr's (W1, W2) for adapter a, W2 (m2, n2) on a Linear, (m2, n2, kh, kw) or (m2, n2·kh·kw) on a conv."""
    W1, parts = _lokr_parts(layer, a)
    return W1, _kron_w2(parts)


def _lokr_linear(layer, x: Tensor, adapters: list[str]) -> Tensor:
    """y = base(x) + Σ_a x (s_a W1 ⊗ W2)^T, as specops's LoKr adapter computes it (no ΔW), into
    the base's own output where specops.adapters._plain_linear allows."""
    out = layer.base_layer(x)
    for a in adapters:
        W1, W2 = _lokr_parts(layer, a)
        W1 = W1 * layer.scaling[a]
        into = _plain_linear(layer.base_layer, x, W1) and _registry._eager()
        xa = layer._cast_input_dtype(x, W1.dtype)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            xa, W1, W2 = xa.to(dtype), W1.to(dtype), tuple(t.to(dtype) for t in W2)
        out = _add_kron_linear(out.to(torch.promote_types(out.dtype, xa.dtype)), xa, W1, W2, into=into)
    return out


def _lokr_delta(layer, a: str) -> Tensor:
    """LoKr's ΔW = s W1 ⊗ W2 in the base weight's shape; on a conv the kernel rides on W2."""
    W1, W2 = _lokr_factors(layer, a)
    W1 = W1 * layer.scaling[a]
    shape = layer.get_base_layer().weight.shape
    if len(shape) == 4:
        W2 = W2.reshape(W2.shape[0], -1, *shape[2:])
        return torch.kron(W1[:, :, None, None], W2.contiguous())
    return torch.kron(W1, W2)


def _loha_delta(layer, a: str) -> Tensor:
    """LoHa's ΔW = s (w1_a w1_b) ⊙ (w2_a w2_b) in the base weight's shape (Tucker: _patch.loha_delta)."""
    t = (layer.hada_t1[a], layer.hada_t2[a]) if a in layer.hada_t1 else (None, None)
    return loha_delta(layer.hada_w1_a[a], layer.hada_w1_b[a], layer.hada_w2_a[a], layer.hada_w2_b[a], *t,
                      layer.scaling[a], layer.get_base_layer().weight.shape)


def _fused(delta_fn):
    """The fused forward for a layer type whose ΔW is delta_fn(layer, a): the base layer run once
    with W0 + Σ_a ΔW_a (F.linear or F.conv2d with the base's stride, padding, dilation, groups)."""

    def run(layer, x: Tensor, adapters: list[str]) -> Tensor:
        base = layer.get_base_layer()
        W = base.weight
        for a in adapters:
            W = W + delta_fn(layer, a)
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, W, base.bias, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, W, base.bias)

    return run


_loha_fused = _fused(_loha_delta)  # autograd keeps LoHa's factors, not its two halves


def _loha(layer, x: Tensor, adapters: list[str]) -> Tensor:
    """PEFT's LoHa: the adapters (not Tucker) whose FLOPs favour it added as their rank-r² products
    (_patch.loha_factored / adapters.add_hadamard: no weight-sized tensor), the others merged into one Linear or conv
    (_loha_fused)."""
    base = layer.get_base_layer()
    factored = [a for a in adapters if a not in layer.hada_t1 and loha_factored(
        base, x, layer.hada_w1_a[a], any(p.requires_grad for p in _adapter_params(layer, a)))]
    merged = [a for a in adapters if a not in factored]
    y = _loha_fused(layer, x, merged) if merged or not factored else None  # None: the first onto base itself
    for a in factored:
        y = add_hadamard(base, x, layer.hada_w1_a[a], layer.hada_w1_b[a], layer.hada_w2_a[a], layer.hada_w2_b[a],
                         layer.scaling[a], y=y)
    return y
_lokr_fused = _fused(_lokr_delta)  # torch.kron keeps only the factors


def _lokr_conv(layer, x: Tensor, adapters: list[str]) -> Tensor:
    """LoKr on a conv: adapters that train and whose FLOPs favour it added factored, ΔW never formed
    (_patch.lokr_conv_factored), the others merged into one conv (_lokr_fused)."""
    base = layer.get_base_layer()
    factored = {}
    for a in adapters:
        W1, parts = _lokr_parts(layer, a)
        if lokr_conv_factored(base, x, W1, parts, any(p.requires_grad for p in _adapter_params(layer, a))):
            factored[a] = (W1 * layer.scaling[a], parts)
    merged, added = [a for a in adapters if a not in factored], list(factored.values())
    if merged or not added:
        y = _lokr_fused(layer, x, merged)
    else:  # the base conv alone: with the first update, through kron_conv_onto
        y = kron_conv_onto(base, x, *added.pop(0))
    for W1, parts in added:
        y = _add_kron_conv(y, x, W1, parts, base)
    return y


def _lowrank(factors):
    """The forward of a layer type whose adapter a adds ((x Aᵀ) diag(s)) Bᵀ, (A, s, B) = factors(layer, a):
    the first adapter with the base layer as one op where specops.adapters.lowrank_onto can, then one
    lowrank_linear pass per adapter onto the base output (in the adapters' dtype, cast back)."""

    def run(layer, x: Tensor, adapters: list[str]) -> Tensor:
        out = None
        for a in adapters:
            A, s, B = factors(layer, a)
            xa = layer._cast_input_dtype(x, A.dtype)
            if out is None and xa is x:
                out = lowrank_onto(layer.base_layer, x, A, s, B)
            else:
                out = add_lowrank(layer.base_layer(x) if out is None else out, xa, A, s, B)
        return layer.base_layer(x) if out is None else out

    return run


def _adalora_factors(layer, a: str) -> tuple[Tensor, Tensor, Tensor]:
    """AdaLoRA's (A, c E, B), c = s_a / (ranknum_a + 1e-5) (ranknum's gradient kept: PEFT 0.21 leaves it trainable)."""
    A = layer.lora_A[a]
    c = layer.scaling[a] / (layer.ranknum[a] + EPS_RANKNUM)
    return A, (layer.lora_E[a].view(-1) * c).to(A.dtype), layer.lora_B[a]


def _lora_factors(layer, a: str) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA's (A, s_a·1, B): the scaling as the diagonal."""
    A = layer.lora_A[a].weight
    return A, A.new_full((A.shape[0],), layer.scaling[a]), layer.lora_B[a].weight


def _lora_conv(layer, x: Tensor, adapters: list[str]) -> Tensor:
    """y = base(x) + Σ_a s_a B_a * (A_a * x): A_a's conv with its own geometry (PEFT's lora_A), the 1x1
    up-projection one batched GEMM onto the output (specops.adapters._add_up_projection); the first adapter
    through specops.adapters.lowrank_conv_onto where A_a has the base's geometry and _plain_conv allows."""
    base, out = layer.base_layer, None
    for a in adapters:
        conv_a, B = layer.lora_A[a], layer.lora_B[a].weight
        xa = layer._cast_input_dtype(x, conv_a.weight.dtype)
        B = B.view(B.shape[0], B.shape[1]) * layer.scaling[a]
        if (out is None and xa is x and conv_a.weight.shape[1:] == base.weight.shape[1:]
                and _conv_geometry(conv_a) == _conv_geometry(base) and _plain_conv(base, x, B)):
            out = lowrank_conv_onto(base, x, conv_a.weight, B)
            dtype = out.dtype
            continue
        if out is None:
            out = base(x)
            dtype = out.dtype  # PEFT's result dtype: the sum in the promoted one, cast back
        h = conv_a(xa)
        if torch.is_autocast_enabled(x.device.type):
            h, B = h.to(torch.get_autocast_dtype(x.device.type)), B.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            out = _add_up_projection(out.to(torch.promote_types(out.dtype, h.dtype)), B, h)
    return base(x) if out is None else out.to(dtype)


_BOFT_GATHERS = WeakTensorKeyDictionary()  # a layer's boft_P buffer -> (its _version, its gathers)


def _boft_gathers(P: Tensor) -> list[Tensor | None]:
    """PEFT's boft_P (N, n, n) permutation matrices as specops.adapters.butterfly's gathers: PEFT's stage
    P_i BD P_iᵀ is Π_iᵀ BD Π_i with Π_i t = t[P_i.argmax(0)] (None where P_i is the identity, as for N = 1).
    Cached per buffer and version: a conv's P holds (in·k²)² values."""
    hit = _BOFT_GATHERS.get(P)
    if hit is None or hit[0] != P._version:
        ident = torch.arange(P.shape[-1], device=P.device)
        hit = (P._version, [None if torch.equal(g, ident) else g for g in P.argmax(dim=1)])
        _BOFT_GATHERS[P] = hit
    return hit[1]


def _boft(layer, x: Tensor, adapters: list[str]) -> Tensor:
    """PEFT's BOFT, x (M_{a_k} ⋯ M_{a_1}) run through the base, with the rotation moved onto W0 (one GEMM / conv):

        W = diag(Π_a s_a) (M_{a_k} ⋯ M_{a_1} W0ᵀ)ᵀ,  M_a = B_{N-1} ⋯ B_0 = butterfly(·, cayley(Rᵀ - R), boft_P)

    (PEFT's cayley_batch (I - S)(I + S)^-1, S = (R - Rᵀ)/2, is cayley(Rᵀ - R)); never an n x n matrix.
    A conv runs F.conv2d with PEFT's arguments (stride[0], padding[0], no dilation)."""
    base = layer.get_base_layer()
    W0 = base.weight
    gathers = _boft_gathers(layer.boft_P)
    if isinstance(base, nn.Linear) and x.requires_grad and torch.is_grad_enabled() and not W0.requires_grad \
            and len(adapters) * len(gathers) <= BUTTERFLY_ROWS_MAX_STAGES:
        return _boft_rotated_input(layer, x, adapters, gathers)
    t, s = W0.flatten(1).mT, None
    for a in adapters:
        R = layer.boft_R[a]
        t = butterfly(t, cayley((R.mT - R).flatten(0, 1)).view(R.shape), gathers)
        s = layer.boft_s[a].view(-1) if s is None else s * layer.boft_s[a].view(-1)
    W = t.mT if s is None else t.mT * s[:, None]
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, W.view(W0.shape), base.bias, padding=base.padding[0], stride=base.stride[0])
    return F.linear(x, W, base.bias)


def _neumann_coeffs(terms: int) -> list[float]:
    """The coefficients of PEFT's truncated Neumann series for its Cayley transform, (I + Q)(I - Q)^{-1} ~
    I + 2 Q + 2 Q^2 + ... (OFTRotationModule._cayley_batch with `terms`): I, then 2 Q for 2 terms; from 3
    terms, 2 Q^k for k <= max(2, terms - 2) and a last Q^k of coefficient 1 (3 and 4 terms alike)."""
    if terms <= 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    return [1.0] + [2.0] * max(2, terms - 2) + [1.0]


def _oft_blocks(mod) -> Tensor:
    """PEFT's blocks R (r, b, b) of an OFTRotationModule, from its own skew matrices Q (_pytorch_skew_symmetric of
    its weight; coft's projection first): its Neumann series as one matrix_polynomial op, or its exact
    (I - Q)(I + Q)^{-1} as cayley(-2 Q), never a batched LU solve."""
    if mod.coft:  # PEFT projects the weight in place, under no_grad, at every call
        with torch.no_grad():
            mod.weight.copy_(mod._project_batch(mod.weight, eps=mod.eps))
    Q = mod._pytorch_skew_symmetric(mod.weight, mod.block_size)
    if mod.use_cayley_neumann:
        return matrix_polynomial(Q, _neumann_coeffs(mod.num_cayley_neumann_terms))
    return cayley(-2.0 * Q)


def _oft(layer, x: Tensor, adapters: list[str]) -> Tensor:
    """PEFT's OFT Linear: x rotated by each active adapter's blocks in turn (x_i R_i on the i-th block of
    features), then the base layer. R is PEFT's function of its weight (_oft_blocks); the rotation runs as
    one block_diag_matmul pass forward and one backward instead of einsum's batched GEMMs of inner size b."""
    dtype = x.dtype
    for a in adapters:
        mod = layer.oft_R[a]
        x = layer._cast_input_dtype(x, mod.weight.dtype)
        R = _oft_blocks(mod)
        k = mod.in_features // mod.block_size if mod.block_share else mod.r
        rotated = block_diag_matmul(x if x.dtype == R.dtype else x.to(R.dtype), R.expand(k, -1, -1))
        x = rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)
    return layer.base_layer(x if x.dtype == dtype else x.to(dtype))


def _boft_rotated_input(layer, x: Tensor, adapters: list[str], gathers) -> Tensor:
    """PEFT's BOFT Linear in-network with W0 frozen: x M (M = M_{a_k} ⋯ M_{a_1}, M_a = B_{N-1} ⋯ B_0) applied to
    x stage by stage (specops.adapters.butterfly_rows: x M_a = x (M_aᵀ)ᵀ, M_aᵀ the butterfly of the transposed
    blocks in reverse order), then (x M) W0ᵀ ⊙ s + b: no dense weight gradient, where x's gradient is
    wanted anyway."""
    base = layer.get_base_layer()
    s = None
    for a in reversed(adapters):
        R = layer.boft_R[a]
        blocks = cayley((R.mT - R).flatten(0, 1)).view(R.shape).to(x.dtype)
        x = butterfly_rows(x, blocks.mT.flip(0), gathers[::-1])
        s = layer.boft_s[a].view(-1) if s is None else s * layer.boft_s[a].view(-1)
    y = F.linear(x, base.weight) * s.to(x.dtype)
    return y if base.bias is None else y + base.bias


@functools.cache
def _table() -> dict[type, tuple]:
    """PEFT layer class -> (patched computation, whether it fuses into the base layer's weight)."""
    from peft.tuners import adalora, loha, lokr, lora
    from peft.tuners.boft import layer as boft
    from peft.tuners.oft import layer as oft

    return {
        oft.Linear: (_oft, False),
        boft.Linear: (_boft, True),
        boft.Conv2d: (_boft, True),
        lokr.Linear: (_lokr_linear, False),
        loha.Linear: (_loha, True),
        lokr.Conv2d: (_lokr_conv, True),
        loha.Conv2d: (_loha, True),
        adalora.SVDLinear: (_lowrank(_adalora_factors), False),
        lora.Linear: (_lowrank(_lora_factors), False),
        lora.Conv2d: (_lora_conv, False),
    }


def _has(layer, name: str) -> bool:
    """hasattr for a module attribute, without nn.Module.__getattr__'s raised AttributeError when it is absent
    (the patched forward asks several times per call)."""
    return name in layer.__dict__ or name in layer._modules or name in layer._parameters or name in layer._buffers


def _available(layer) -> set[str]:
    """The adapters the layer holds (LoKr / LoHa say so; BOFT's are its boft_R keys, OFT's its oft_R keys,
    AdaLoRA's its lora_A keys)."""
    if _has(layer, "module_dropout"):
        return layer._available_adapters
    for name in ("boft_R", "oft_R"):
        if _has(layer, name):
            return set(getattr(layer, name))
    return set(layer.lora_A)


def _draws_masks(layer, a: str) -> bool:
    """Whether adapter a draws random masks in training mode (module / rank dropout; BOFT's multiplicative
    block dropout; AdaLoRA's lora_dropout)."""
    if _has(layer, "module_dropout"):
        return bool(layer.module_dropout[a] or layer.rank_dropout[a])
    if _has(layer, "boft_dropout"):
        return getattr(layer.boft_dropout[a], "p", 0.0) > 0
    if _has(layer, "oft_R"):  # PEFT 0.21's OFT forward never runs its oft_dropout
        return False
    dropout = layer.lora_dropout[a]
    return isinstance(dropout, nn.Dropout) and dropout.p > 0


def _peft_only(layer, a: str) -> bool:
    """Adapter a computes what no patched path does: a LoRA variant (DoRA, aLoRA, ...) or a bias on lora_B."""
    return (_has(layer, "lora_variant") and a in layer.lora_variant) or (_has(layer, "lora_bias") and bool(layer.lora_bias.get(a)))


def _adapter_params(layer, a: str):
    return [d[a] for d in (getattr(layer, n) for n in layer.adapter_layer_names) if a in d]


def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """The patched forward (module docstring); PEFT's own forward where it would differ."""
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    run, fuses = _table()[type(self)]
    adapters = [a for a in self.active_adapters if a in _available(self)]
    if any(_peft_only(self, a) for a in adapters) or (self.training and any(_draws_masks(self, a) for a in adapters)):
        return peft_forward(self, x, *args, **kwargs)
    if fuses and not torch.is_autocast_enabled(x.device.type):
        dtypes = {x.dtype, self.get_base_layer().weight.dtype}
        dtypes.update(p.dtype for a in adapters for p in _adapter_params(self, a))
        if len(dtypes) > 1:
            return peft_forward(self, x, *args, **kwargs)
    if self.training and _has(self, "module_dropout"):  # PEFT's draw, made even at dropout 0 (module docstring)
        adapters = [a for a in adapters if torch.rand(1) > self.module_dropout[a]]
    out = run(self, x, adapters)
    # PEFT's LoKr / LoHa / BOFT / OFT return the input's dtype; its LoRA and AdaLoRA the base output's (run's)
    return out.to(x.dtype) if _has(self, "module_dropout") or run in (_boft, _oft) else out




# ----------------------------------------------------------------------------- apply / revert


_UNCOVERED = {  # PEFT tuner package -> why specops has nothing to offer it
    "peft.tuners.oft": (" (PEFT's OFT Conv2d rotates the unfolded patches and folds them back, overlaps "
                        "summed: not a rotation of the weight)"),
}


def _why_not(layer, table) -> str | None:
    """Why this PEFT layer stays on PEFT's path, or None when it can be patched."""
    cls = type(layer)
    if cls not in table:
        why = f"{cls.__module__}.{cls.__qualname__}: no specops path for this layer type"
        return why + _UNCOVERED.get(cls.__module__.rpartition(".")[0], "")
    if "forward" in layer.__dict__:
        return "its forward is already replaced on the instance (e.g. by accelerate hooks)"
    base = layer.get_base_layer()
    if layer.base_layer is not base:
        return "nested tuner layers (its base_layer is itself a tuner layer)"
    if table[cls][0] is _lora_conv and base.groups != 1:
        return f"grouped conv (groups={base.groups}): PEFT's lora_B is then a grouped 1x1 conv"
    if table[cls][1]:
        kind = nn.Conv2d if isinstance(base, nn.Conv2d) else nn.Linear
        if type(base) is not kind or "forward" in base.__dict__:
            return (f"base layer is a {type(base).__name__}, not a plain {kind.__name__} "
                    "(the fused path runs its weight)")
        if base._forward_hooks or base._forward_pre_hooks:
            return "base layer has forward hooks, which the fused path would not run"
        if kind is nn.Conv2d and base.padding_mode != "zeros" and table[cls][0] is not _boft:  # PEFT's BOFT pads with zeros too
            return f"conv padding_mode={base.padding_mode!r}: PEFT pads ΔW's conv with zeros, the base's differently"
    return None


def apply(model: nn.Module) -> dict:
    """Patch every covered PEFT layer of `model` in place (module docstring). Idempotent.

    Returns {"patched": [names], "skipped": {name: why}, "notes": {name: note}}: the PEFT tuner
    layers now on specops' path, those left on PEFT's with the reason, and patched layers that run
    PEFT's path in training mode (dropout). With a PEFT version outside SUPPORTED_PEFT it warns,
    patches nothing and reports every tuner layer as skipped.
    """
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    report = refused("peft", peft.__version__, SUPPORTED_PEFT, [n for n, _ in layers], "specops.integrations.peft.apply")
    if report is not None:
        return report
    table = _table()

    def install(layer):
        layer.forward = PatchedForward(_forward, layer)
        notes = []
        own = sorted(a for a in _available(layer) if _peft_only(layer, a))
        if own:
            notes.append(f"adapters {own} are LoRA variants (DoRA, ...) or have lora_bias: this layer runs PEFT's "
                         "forward while they are active")
        dropped = [a for a in _available(layer) if _draws_masks(layer, a)]
        if dropped:
            notes.append(f"adapters {sorted(dropped)} have module/rank (or lora) dropout > 0: in training mode this layer "
                         "runs PEFT's forward while they are active")
        if getattr(layer, "hada_t1", None):
            notes.append("PEFT 0.21's Tucker LoHa backward (HadaWeightCP) returns wrong gradients for hada_w1_a and "
                         "hada_w2_a; this path gives the true (autograd) ones, so training here differs from PEFT's")
        return "; ".join(notes)

    return patch(layers, lambda layer: _why_not(layer, table), install)


def revert(model: nn.Module) -> list[str]:
    """Undo apply(): every patched layer runs PEFT's own forward again. Returns the reverted names."""
    names = []
    for name, module in model.named_modules():
        if is_patched(module):
            del module.forward
            names.append(name)
    return names
