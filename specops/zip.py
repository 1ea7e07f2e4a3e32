"""ZipLoRA: merge a content LoRA and a style LoRA with one learned coefficient per input column.

Conventions (shared/DESIGN.md): W is (out, in), y = x W^T + b; a LoRA update is ΔW = B A with
B (out, r), A (r, in); "column j" is input dimension j, so the mergers m_c, m_s have `in` entries:

    ΔW_m = s_c·B_c A_c diag(m_c) + s_s·B_s A_s diag(m_s).

Since ΔW diag(m) x^T = B (A (m ⊙ x^T)), nothing of shape (out, in) is ever needed to apply or to
train the merge. Folding the merger and the scale into A (r x in values, not T x in):

    A' = [s_c·A_c diag(m_c); s_s·A_s diag(m_s)]   (r_c + r_s, in),   B' = [B_c | B_s]   (out, r_c + r_s)
    h  = x A'^T   (T, r),      y = x W^T + b + h B'^T                    (both LoRAs in one pass over x)

and for a loss with grad_y = g:

    u = g B'   (T, r),   G = u^T x   (r, in; the token reduction, inside one GEMM)
    grad_m_c[j] = s_c Σ_k A_c[k, j] G_c[k, j]   (= s_c Σ_t x[t, j] (g B_c A_c)[t, j])
    grad_A_c    = s_c G_c diag(m_c),   grad_x = g W + u A',   grad_B' = g^T h,
    grad_W = g^T x,   grad_b = Σ_t g[t].

Extra memory per call is O((T + out + in)·r): h or u, A', B', G. The public formulation instead
builds both dense ΔW every forward (2·out·in·r FLOPs and several (out, in) buffers) and multiplies
x by an (out, in) matrix twice per step (forward and the ΔW gradient).

Ops (torch.ops.specops.*): zip_merge (dense merge, for export), zip_merge_lora (the merge as one
exact LoRA of rank r_c + r_s), zip_lora_linear (+ zip_lora_linear_backward), merger_penalty
(+ merger_penalty_backward). The module (an nn.Linear with two frozen LoRAs and trainable mergers)
is specops.adapters.ZipLoRA, also exported as specops.ZipLoRALinear.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backend
from .kron import _FLOAT_DTYPES, _acc_dtype

__all__ = [
    "zip_merge",
    "zip_merge_lora",
    "zip_lora_linear",
    "merger_penalty",
    "zip_merge_reference",
    "zip_merge_lora_reference",
    "zip_lora_linear_reference",
    "merger_penalty_reference",
]

PENALTY_KINDS = ("abs_product", "dot", "cosine")
# |m_c|·|m_s| below this counts as zero in "cosine" (as in F.cosine_similarity).
_COS_EPS = 1e-8


def _shape(t: Tensor | None) -> tuple:
    return None if t is None else tuple(t.shape)


def _check_same(name: str, t: Tensor, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from x's dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: device {t.device} differs from x's device {ref.device}")


def _check_lora(tag: str, B: Tensor, A: Tensor, m: Tensor, out_f: int, in_f: int) -> int:
    """Check one LoRA (B (out, r), A (r, in)) and its merger m (in,); returns r."""
    if A.dim() != 2 or A.shape[1] != in_f:
        raise ValueError(f"A_{tag}: expected shape (r_{tag}, in_features={in_f}), got {_shape(A)}")
    r = A.shape[0]
    if B.dim() != 2 or B.shape != (out_f, r):
        raise ValueError(
            f"B_{tag}: expected shape (out_features={out_f}, r_{tag}={r}) to match A_{tag} "
            f"{_shape(A)}, got {_shape(B)}"
        )
    if m.dim() != 1 or m.shape[0] != in_f:
        raise ValueError(f"m_{tag}: expected shape (in_features={in_f},), got {_shape(m)}")
    return r


def _check_linear(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s) -> tuple[int, int, int, int]:
    """Validate zip_lora_linear inputs; returns (out_features, in_features, r_c, r_s)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype {_FLOAT_DTYPES}, got {x.dtype}")
    if weight is not None:
        if weight.dim() != 2:
            raise ValueError(f"weight: expected shape (out_features, in_features), got {_shape(weight)}")
        out_f, in_f = weight.shape
    else:
        if B_c.dim() != 2 or A_c.dim() != 2:
            raise ValueError(
                f"B_c, A_c: expected shapes (out_features, r_c) and (r_c, in_features), got "
                f"{_shape(B_c)} and {_shape(A_c)}"
            )
        out_f, in_f = B_c.shape[0], A_c.shape[1]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x: expected shape (..., in_features={in_f}), got {_shape(x)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias: expected shape (out_features={out_f},), got {_shape(bias)}")
    r_c = _check_lora("c", B_c, A_c, m_c, out_f, in_f)
    r_s = _check_lora("s", B_s, A_s, m_s, out_f, in_f)
    named = dict(weight=weight, bias=bias, B_c=B_c, A_c=A_c, m_c=m_c, B_s=B_s, A_s=A_s, m_s=m_s)
    for name, t in named.items():
        if t is not None:
            _check_same(name, t, x)
    return out_f, in_f, r_c, r_s


# ----------------------------------------------------------------------------- references


def zip_merge_reference(delta_c: Tensor, delta_s: Tensor, m_c: Tensor, m_s: Tensor) -> Tensor:
    """ΔW_c diag(m_c) + ΔW_s diag(m_s) by broadcasting (differentiable by autograd)."""
    return delta_c * m_c + delta_s * m_s


def zip_merge_lora_reference(B_c, A_c, B_s, A_s, m_c, m_s, scale_c=1.0, scale_s=1.0):
    """(B_m, A_m) = ([B_c | B_s], [scale_c·A_c diag(m_c); scale_s·A_s diag(m_s)])."""
    return torch.cat([B_c, B_s], 1), torch.cat([scale_c * A_c * m_c, scale_s * A_s * m_s], 0)


def zip_lora_linear_reference(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c=1.0, scale_s=1.0):
    """The dense formulation: F.linear(x, W, b) + F.linear(x, s_c ΔW_c diag(m_c) + s_s ΔW_s diag(m_s)).

    Materialises both (out, in) updates, like the public implementation; the test oracle.
    """
    delta = zip_merge_reference(scale_c * (B_c @ A_c), scale_s * (B_s @ A_s), m_c, m_s)
    y = F.linear(x, delta)
    if weight is not None:
        y = y + F.linear(x, weight, bias)
    elif bias is not None:
        y = y + bias
    return y


def merger_penalty_reference(m_c_list: Sequence[Tensor], m_s_list: Sequence[Tensor], kind: str = "abs_product"):
    """Σ over layers of the per-layer penalty, one layer at a time (the Python loop)."""
    total = 0
    for mc, ms in zip(m_c_list, m_s_list):
        if kind == "abs_product":  # the mean over a layer without columns counts as 0
            total = total + (mc * ms).abs().sum() / max(mc.numel(), 1)
        elif kind == "dot":
            total = total + (mc * ms).sum().abs()
        else:
            den = (mc.square().sum() * ms.square().sum()).clamp_min(_COS_EPS**2).sqrt()
            total = total + ((mc * ms).sum() / den).abs()
    return total


# ----------------------------------------------------------------------------- zip_merge(_lora)


def _zip_merge_impl(delta_c, delta_s, m_c, m_s):
    return zip_merge_reference(delta_c, delta_s, m_c, m_s)


def _zip_merge_lora_impl(B_c, A_c, B_s, A_s, m_c, m_s, scale_c=1.0, scale_s=1.0):
    return zip_merge_lora_reference(B_c, A_c, B_s, A_s, m_c, m_s, scale_c, scale_s)


# Pure compositions of torch ops (bandwidth bound, one pass): autograd, fake tensors and
# torch.compile come from the decomposition, and every backend runs the same code.
torch.library.define("specops::zip_merge", "(Tensor delta_c, Tensor delta_s, Tensor m_c, Tensor m_s) -> Tensor")
torch.library.impl("specops::zip_merge", "CompositeImplicitAutograd")(_zip_merge_impl)
torch.library.define(
    "specops::zip_merge_lora",
    "(Tensor B_c, Tensor A_c, Tensor B_s, Tensor A_s, Tensor m_c, Tensor m_s, float scale_c=1.0, "
    "float scale_s=1.0) -> (Tensor, Tensor)",
)
torch.library.impl("specops::zip_merge_lora", "CompositeImplicitAutograd")(_zip_merge_lora_impl)


def zip_merge(delta_c: Tensor, delta_s: Tensor, m_c: Tensor, m_s: Tensor) -> Tensor:
    """ΔW_m = ΔW_c diag(m_c) + ΔW_s diag(m_s): the dense merge (export, fusing into weights).

    Args:
        delta_c, delta_s: (out, in) updates; m_c, m_s: (in,) mergers, one per input column.
    Differentiable in all four. Raises ValueError on shape, dtype or device mismatches.
    """
    if delta_c.dim() != 2:
        raise ValueError(f"delta_c: expected shape (out_features, in_features), got {_shape(delta_c)}")
    out_f, in_f = delta_c.shape
    if delta_s.shape != delta_c.shape:
        raise ValueError(f"delta_s: expected shape ({out_f}, {in_f}) like delta_c, got {_shape(delta_s)}")
    for name, m in (("m_c", m_c), ("m_s", m_s)):
        if m.dim() != 1 or m.shape[0] != in_f:
            raise ValueError(f"{name}: expected shape (in_features={in_f},), got {_shape(m)}")
    for name, t in (("delta_s", delta_s), ("m_c", m_c), ("m_s", m_s)):
        if t.dtype != delta_c.dtype or t.device != delta_c.device:
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != delta_c's {delta_c.dtype}/{delta_c.device}")
    return torch.ops.specops.zip_merge(delta_c, delta_s, m_c, m_s)


def zip_merge_lora(B_c, A_c, B_s, A_s, m_c, m_s, scale_c: float = 1.0, scale_s: float = 1.0):
    """The merge as one exact LoRA of rank r_c + r_s: returns (B_m, A_m) with

        B_m = [B_c | B_s]  (out, r_c + r_s),   A_m = [s_c·A_c diag(m_c); s_s·A_s diag(m_s)]  (r_c + r_s, in),

    so B_m A_m = zip_merge(s_c B_c A_c, s_s B_s A_s, m_c, m_s) and the result loads anywhere a
    LoRA (with scale 1) loads. Differentiable. Raises ValueError on rank/width mismatches.
    """
    if B_c.dim() != 2 or A_c.dim() != 2:
        raise ValueError(f"B_c, A_c: expected (out, r_c) and (r_c, in), got {_shape(B_c)} and {_shape(A_c)}")
    out_f, in_f = B_c.shape[0], A_c.shape[1]
    _check_lora("c", B_c, A_c, m_c, out_f, in_f)
    _check_lora("s", B_s, A_s, m_s, out_f, in_f)
    for name, t in dict(A_c=A_c, B_s=B_s, A_s=A_s, m_c=m_c, m_s=m_s).items():
        if t.dtype != B_c.dtype or t.device != B_c.device:
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != B_c's {B_c.dtype}/{B_c.device}")
    return torch.ops.specops.zip_merge_lora(B_c, A_c, B_s, A_s, m_c, m_s, float(scale_c), float(scale_s))


# ----------------------------------------------------------------------------- zip_lora_linear kernels

# Gradient slots of zip_lora_linear, in argument order.
_GRAD_SLOTS = ("x", "weight", "bias", "B_c", "A_c", "m_c", "B_s", "A_s", "m_s")


def _pack(B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s):
    """A' = [s_c A_c diag(m_c); s_s A_s diag(m_s)], B' = [B_c | B_s]."""
    return torch.cat([B_c, B_s], 1), torch.cat([(scale_c * m_c) * A_c, (scale_s * m_s) * A_s], 0)


def _fwd_torch(x2, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s):
    Bp, Ap = _pack(B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)
    h = x2 @ Ap.t()
    if weight is not None:
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        return y.addmm_(h, Bp.t())
    y = h @ Bp.t()
    return y.add_(bias) if bias is not None else y


def _bwd_torch(g2, x2, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    n = dict(zip(_GRAD_SLOTS, need))
    r_c = A_c.shape[0]
    Bp, Ap = _pack(B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)
    out = dict.fromkeys(_GRAD_SLOTS)
    if n["x"] or n["A_c"] or n["A_s"] or n["m_c"] or n["m_s"]:
        u = g2 @ Bp
        if n["x"]:
            gx = g2 @ weight if weight is not None else None
            out["x"] = gx.addmm_(u, Ap) if gx is not None else u @ Ap
        if n["A_c"] or n["A_s"] or n["m_c"] or n["m_s"]:
            G = u.t() @ x2  # (r, in): the reduction over tokens
            for tag, A, m, s, Gk in (("c", A_c, m_c, scale_c, G[:r_c]), ("s", A_s, m_s, scale_s, G[r_c:])):
                if n["m_" + tag]:
                    out["m_" + tag] = (Gk * A).sum(0, dtype=torch.promote_types(A.dtype, torch.float32)).mul_(s).to(A.dtype)
                if n["A_" + tag]:
                    out["A_" + tag] = Gk * (s * m)
    if n["B_c"] or n["B_s"]:
        gB = g2.t() @ (x2 @ Ap.t())  # h recomputed rather than kept from the forward
        out["B_c"], out["B_s"] = gB[:, :r_c], gB[:, r_c:]
    if n["weight"]:
        out["weight"] = g2.t() @ x2
    if n["bias"]:
        out["bias"] = g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)).to(g2.dtype)
    return [out[k] for k in _GRAD_SLOTS]


def _fwd_ext(x2, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s):
    return torch.ops.specops_ext.zip_lora_linear_fwd(x2, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)


def _bwd_ext(g2, x2, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    grads = torch.ops.specops_ext.zip_lora_linear_bwd(
        g2, x2, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, list(need)
    )
    return [g if nd else None for g, nd in zip(grads, need)]


@functools.cache
def _triton():
    from .triton_kernels import zip as mod

    return mod


def _fwd_triton(*args):
    return _triton().zip_lora_linear_fwd(*args)


def _bwd_triton(*args):
    return _triton().zip_lora_linear_bwd(*args)


_FWD = {"torch": _fwd_torch, "cpp": _fwd_ext, "cuda": _fwd_ext, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpp": _bwd_ext, "cuda": _bwd_ext, "triton": _bwd_triton}


def _rows(t: Tensor) -> Tensor:
    """(T, n) view of (..., n) with a contiguous last dim."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# ----------------------------------------------------------------------------- zip_lora_linear op


@torch.library.custom_op("specops::zip_lora_linear", mutates_args=())
def _zip_lora_linear_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, B_c: Tensor, A_c: Tensor, m_c: Tensor,
    B_s: Tensor, A_s: Tensor, m_s: Tensor, scale_c: float = 1.0, scale_s: float = 1.0,
) -> Tensor:
    out_f, _, _, _ = _check_linear(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s)
    impl = _FWD[_backend.choose(x.device.type, _FWD)]
    y = impl(_rows(x), weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)
    return y.reshape(*x.shape[:-1], out_f)


@_zip_lora_linear_op.register_fake
def _(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c=1.0, scale_s=1.0):
    out_f, _, _, _ = _check_linear(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s)
    return x.new_empty(*x.shape[:-1], out_f)


@torch.library.custom_op("specops::zip_lora_linear_backward", mutates_args=())
def _zip_lora_linear_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, B_c: Tensor, A_c: Tensor, m_c: Tensor,
    B_s: Tensor, A_s: Tensor, m_s: Tensor, scale_c: float, scale_s: float, need: list[bool],
) -> list[Tensor]:
    """Gradients for (x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s); empty (0,) where not needed."""
    _check_linear(x, weight, None, B_c, A_c, m_c, B_s, A_s, m_s)
    impl = _BWD[_backend.choose(x.device.type, _BWD)]
    g2 = _rows(grad_y)
    grads = impl(g2, _rows(x), weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need)
    shapes = _grad_shapes(x, weight, B_c, A_c, m_c, B_s, A_s, m_s)
    return [_own(g, s) if nd else x.new_empty(0) for g, s, nd in zip(grads, shapes, need)]


def _own(g: Tensor, shape) -> Tensor:
    """g as a contiguous tensor of `shape` that shares memory with no other output of the op.

    The B_c / B_s gradients are column slices of one buffer; a slice that counts as contiguous
    (out_features = 1, rank 0, no tokens) would come back from .contiguous() as an aliasing view,
    which a custom op may not return.
    """
    g2 = g.reshape(shape)
    return g2.clone(memory_format=torch.contiguous_format) if g._base is not None else g2.contiguous()


def _grad_shapes(x, weight, B_c, A_c, m_c, B_s, A_s, m_s):
    out_f = B_c.shape[0]
    w_shape = weight.shape if weight is not None else (0,)
    return [x.shape, w_shape, (out_f,), B_c.shape, A_c.shape, m_c.shape, B_s.shape, A_s.shape, m_s.shape]


@_zip_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    _check_linear(x, weight, None, B_c, A_c, m_c, B_s, A_s, m_s)
    shapes = _grad_shapes(x, weight, B_c, A_c, m_c, B_s, A_s, m_s)
    return [x.new_empty(s) if nd else x.new_empty(0) for s, nd in zip(shapes, need)]


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s = inputs
    ctx.need = [t is not None and t.requires_grad for t in (x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s)]
    ctx.scales = (scale_c, scale_s)
    ctx.has_weight = weight is not None
    saved = (x, weight if weight is not None else x.new_empty(0), B_c, A_c, m_c, B_s, A_s, m_s)
    ctx.save_for_backward(*saved)


def _linear_backward(ctx, grad_y):
    x, weight, B_c, A_c, m_c, B_s, A_s, m_s = ctx.saved_tensors
    if not any(ctx.need):
        return (None,) * 11
    grads = torch.ops.specops.zip_lora_linear_backward(
        grad_y, x, weight if ctx.has_weight else None, B_c, A_c, m_c, B_s, A_s, m_s, *ctx.scales, ctx.need
    )
    return (*[g if nd else None for g, nd in zip(grads, ctx.need)], None, None)


_zip_lora_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def zip_lora_linear(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, B_c: Tensor, A_c: Tensor, m_c: Tensor,
    B_s: Tensor, A_s: Tensor, m_s: Tensor, scale_c: float = 1.0, scale_s: float = 1.0,
) -> Tensor:
    """y = x W^T + b + s_c·(x diag(m_c)) A_c^T B_c^T + s_s·(x diag(m_s)) A_s^T B_s^T, no (out, in) intermediate.

    Args:
        x: (..., in). weight: (out, in) or None (adapter branch only). bias: (out,) or None.
        B_c: (out, r_c), A_c: (r_c, in), m_c: (in,); B_s, A_s, m_s likewise with rank r_s.
        scale_c, scale_s: the LoRAs' scales (alpha / r).
    Returns:
        (..., out) in x's dtype (bf16/fp16: GEMMs accumulate in fp32).

    Differentiable in every tensor argument; only the gradients asked for are computed (merger
    training asks for m_c, m_s only: two (T x r)-thin GEMMs, see the module docstring). The base
    GEMM uses torch's GEMM (MKL/oneDNN, cuBLAS); the adapter branch is fused per backend. Raises
    ValueError naming the argument and the expected shape on rank/width mismatches between the
    LoRAs and the base layer, mergers of the wrong length, or mixed dtypes/devices.
    """
    return torch.ops.specops.zip_lora_linear(
        x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, float(scale_c), float(scale_s)
    )


# ----------------------------------------------------------------------------- merger_penalty


def _check_penalty(m_c_list, m_s_list, kind) -> None:
    if kind not in PENALTY_KINDS:
        raise ValueError(f"kind: expected one of {PENALTY_KINDS}, got {kind!r}")
    if not isinstance(m_c_list, (list, tuple)) or len(m_c_list) == 0:
        raise ValueError("m_c_list: expected a non-empty list of (n_l,) merger vectors")
    if not isinstance(m_s_list, (list, tuple)) or len(m_s_list) != len(m_c_list):
        n = len(m_s_list) if isinstance(m_s_list, (list, tuple)) else type(m_s_list).__name__
        raise ValueError(f"m_s_list: expected {len(m_c_list)} vectors like m_c_list, got {n}")
    ref = m_c_list[0]
    if ref.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"m_c_list[0]: expected a floating dtype {_FLOAT_DTYPES}, got {ref.dtype}")
    for i, (mc, ms) in enumerate(zip(m_c_list, m_s_list)):
        if mc.dim() != 1:
            raise ValueError(f"m_c_list[{i}]: expected a 1-D (in_features,) vector, got {_shape(mc)}")
        if ms.shape != mc.shape:
            raise ValueError(f"m_s_list[{i}]: expected shape ({mc.shape[0]},) like m_c_list[{i}], got {_shape(ms)}")
        for name, t in ((f"m_c_list[{i}]", mc), (f"m_s_list[{i}]", ms)):
            if t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != m_c_list[0]'s {ref.dtype}/{ref.device}")


def _segments(m_list):
    lengths = torch.tensor([m.shape[0] for m in m_list], device=m_list[0].device)
    seg = torch.repeat_interleave(torch.arange(len(m_list), device=m_list[0].device), lengths)
    return lengths, seg


def _layer_sums(values, seg, L):
    return values.new_zeros(L).index_add_(0, seg, values)


def _penalty_parts(m_c_list, m_s_list, kind):
    """Flattened mergers (accumulation dtype) and per-layer statistics, all layers at once."""
    acc = _acc_dtype(m_c_list[0].dtype)
    mc, ms = torch.cat(m_c_list).to(acc), torch.cat(m_s_list).to(acc)
    lengths, seg = _segments(m_c_list)
    L = len(m_c_list)
    p = mc * ms
    dot = _layer_sums(p.abs() if kind == "abs_product" else p, seg, L)
    if kind != "cosine":
        return mc, ms, lengths, seg, dot, None, None
    nc, ns = _layer_sums(mc * mc, seg, L), _layer_sums(ms * ms, seg, L)
    return mc, ms, lengths, seg, dot, nc, ns


def _penalty_fwd_torch(m_c_list, m_s_list, kind):
    mc, ms, lengths, seg, dot, nc, ns = _penalty_parts(m_c_list, m_s_list, kind)
    if kind == "abs_product":
        return (dot / lengths.clamp_min(1)).sum()
    if kind == "dot":
        return dot.abs().sum()
    return (dot / (nc * ns).clamp_min(_COS_EPS**2).sqrt()).abs().sum()


def _penalty_bwd_torch(grad, m_c_list, m_s_list, kind):
    mc, ms, lengths, seg, dot, nc, ns = _penalty_parts(m_c_list, m_s_list, kind)
    g = grad.to(mc.dtype)
    if kind == "abs_product":
        w = (g / lengths.clamp_min(1))[seg] * torch.sign(mc * ms)
        return w * ms, w * mc
    if kind == "dot":
        w = (g * torch.sign(dot))[seg]
        return w * ms, w * mc
    prod = nc * ns
    clamped = prod < _COS_EPS**2
    den = prod.clamp_min(_COS_EPS**2).sqrt()
    cos = dot / den
    w = (g * torch.sign(cos) / den)[seg]
    # d cos / d m_c = m_s / den - cos m_c / |m_c|^2 (the norm term vanishes where den is clamped)
    kc = torch.where(clamped, 0, cos * den / nc.clamp_min(torch.finfo(nc.dtype).tiny))[seg]
    ks = torch.where(clamped, 0, cos * den / ns.clamp_min(torch.finfo(ns.dtype).tiny))[seg]
    return w * (ms - kc * mc), w * (mc - ks * ms)


def _penalty_fwd_ext(m_c_list, m_s_list, kind):
    return torch.ops.specops_ext.merger_penalty_fwd(m_c_list, m_s_list, PENALTY_KINDS.index(kind))


def _penalty_bwd_ext(grad, m_c_list, m_s_list, kind):
    return torch.ops.specops_ext.merger_penalty_bwd(grad, m_c_list, m_s_list, PENALTY_KINDS.index(kind))


_PFWD = {"torch": _penalty_fwd_torch, "cpp": _penalty_fwd_ext}
_PBWD = {"torch": _penalty_bwd_torch, "cpp": _penalty_bwd_ext}


@torch.library.custom_op("specops::merger_penalty", mutates_args=())
def _merger_penalty_op(m_c_list: list[Tensor], m_s_list: list[Tensor], kind: str) -> Tensor:
    _check_penalty(m_c_list, m_s_list, kind)
    impl = _PFWD[_backend.choose(m_c_list[0].device.type, _PFWD)]
    return impl(m_c_list, m_s_list, kind).to(m_c_list[0].dtype)


@_merger_penalty_op.register_fake
def _(m_c_list, m_s_list, kind):
    _check_penalty(m_c_list, m_s_list, kind)
    return m_c_list[0].new_empty(())


@torch.library.custom_op("specops::merger_penalty_backward", mutates_args=())
def _merger_penalty_backward_op(
    grad: Tensor, m_c_list: list[Tensor], m_s_list: list[Tensor], kind: str
) -> tuple[Tensor, Tensor]:
    """Gradients of all layers, concatenated: (flat grad m_c, flat grad m_s)."""
    _check_penalty(m_c_list, m_s_list, kind)
    impl = _PBWD[_backend.choose(m_c_list[0].device.type, _PBWD)]
    gc, gs = impl(grad, m_c_list, m_s_list, kind)
    dtype = m_c_list[0].dtype
    return gc.to(dtype), gs.to(dtype)


@_merger_penalty_backward_op.register_fake
def _(grad, m_c_list, m_s_list, kind):
    _check_penalty(m_c_list, m_s_list, kind)
    n = sum(m.shape[0] for m in m_c_list)
    return m_c_list[0].new_empty(n), m_c_list[0].new_empty(n)


def _penalty_setup_context(ctx, inputs, output):
    m_c_list, m_s_list, kind = inputs
    ctx.kind = kind
    ctx.L = len(m_c_list)
    ctx.sizes = [m.shape[0] for m in m_c_list]
    ctx.save_for_backward(*m_c_list, *m_s_list)


def _penalty_backward(ctx, grad):
    saved = ctx.saved_tensors
    gc, gs = torch.ops.specops.merger_penalty_backward(grad, list(saved[: ctx.L]), list(saved[ctx.L :]), ctx.kind)
    return list(gc.split(ctx.sizes)), list(gs.split(ctx.sizes)), None


_merger_penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


def merger_penalty(m_c_list: Sequence[Tensor], m_s_list: Sequence[Tensor], kind: str = "abs_product") -> Tensor:
    """The merger regulariser summed over all layers, in one multi-tensor launch.

    With p_l = m_c^l ⊙ m_s^l (layer l has n_l columns):
        "abs_product": Σ_l mean_j |p_l[j]|        (what the public ZipLoRA code converged to;
                                                   a layer with no columns adds 0)
        "dot":         Σ_l |Σ_j p_l[j]|           (the paper's equation Σ |m_c · m_s|)
        "cosine":      Σ_l |cos(m_c^l, m_s^l)|    (the paper's wording; |m_c|·|m_s| clamped at 1e-8).
          Its gradient is zero whenever m_c^l ∥ m_s^l, so at the usual all-ones start it does not
          push the mergers apart at all.
    Args: two equally long lists of 1-D merger vectors (layer l: both (n_l,)), one dtype/device.
    Returns a 0-d tensor in the mergers' dtype (accumulated in fp32, fp64 for fp64). Differentiable
    (sign(0) = 0 at kinks). Raises ValueError on an unknown kind, empty or unequal lists, or
    length/dtype/device mismatches.
    """
    return torch.ops.specops.merger_penalty(list(m_c_list), list(m_s_list), kind)


# ----------------------------------------------------------------------------- module


def _lora_parts(lora, tag: str):
    if not isinstance(lora, (tuple, list)) or len(lora) not in (2, 3):
        raise ValueError(f"{tag}: expected a (B, A) or (B, A, scale) tuple, got {type(lora).__name__}")
    B, A = lora[0], lora[1]
    return B.detach(), A.detach(), float(lora[2]) if len(lora) == 3 else 1.0
