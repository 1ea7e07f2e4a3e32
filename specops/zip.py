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

Ops (torch.ops.specops.*, declared through specops._registry): zip_merge (dense merge, for export) and
zip_merge_lora (the merge as one exact LoRA of rank r_c + r_s), both composite; zip_lora_linear
(+ zip_lora_linear_backward) and merger_penalty (+ merger_penalty_backward) with torch, C++ and
(zip_lora_linear) CUDA and Triton kernels. The module (an nn.Linear with two frozen LoRAs and
trainable mergers) is specops.adapters.ZipLoRA, also exported as specops.ZipLoRALinear.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._constants import FLOAT_DTYPES, ZIP_COS_EPS, acc_dtype
from ._registry import Kernel, declare, triton_module

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

_LINEAR_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor B_c, Tensor A_c, Tensor m_c, Tensor B_s, Tensor A_s, "
    "Tensor m_s, float scale_c=1.0, float scale_s=1.0) -> Tensor"
)
# zip_lora_linear's tensor arguments in its argument order: the order of zip_lora_linear_backward's
# `need` flags and outputs. The kernels take and return gradients by these names, never by position.
GRAD_SLOTS = tuple(
    a.name for a in torch._C.parse_schema("zip_lora_linear" + _LINEAR_SCHEMA).arguments
    if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())
)

# merger_penalty of layer l is |S_l| / D_l, with p = m_c^l ⊙ m_s^l over its n_l columns,
#   S_l = Σ_j |p[j]| (abs_terms) or Σ_j p[j],
#   D_l = max(n_l, 1) (mean), times max(|m_c^l|·|m_s^l|, norm_eps) when norm_eps is not None.
# What each kind asks of the kernels (these flags, not the kind's name, go to C++):
_PENALTY_MATH = {
    "abs_product": {"abs_terms": True, "mean": True, "norm_eps": None},
    "dot": {"abs_terms": False, "mean": False, "norm_eps": None},
    "cosine": {"abs_terms": False, "mean": False, "norm_eps": ZIP_COS_EPS},
}
PENALTY_KINDS = tuple(_PENALTY_MATH)


def _shape(t: Tensor | None) -> tuple:
    return None if t is None else tuple(t.shape)


def _check_shape(t: Tensor, sizes, msg) -> None:
    """ValueError msg() unless t has shape `sizes` (None: any size; sizes may be symbolic)."""
    if t.dim() != len(sizes):
        raise ValueError(msg())
    for have, want in zip(t.shape, sizes):
        if want is not None:
            torch._check_with(ValueError, have == want, msg)


def _check_same(name: str, t: Tensor, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from x's dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: device {t.device} differs from x's device {ref.device}")


def _check_lora(tag: str, B: Tensor, A: Tensor, m: Tensor, out_f, in_f):
    """Check one LoRA (B (out, r), A (r, in)) and its merger m (in,); returns r."""
    _check_shape(A, (None, in_f), lambda: f"A_{tag}: expected shape (r_{tag}, in_features={in_f}), got {_shape(A)}")
    r = A.shape[0]
    _check_shape(B, (out_f, r), lambda: (
        f"B_{tag}: expected shape (out_features={out_f}, r_{tag}={r}) to match A_{tag} {_shape(A)}, got {_shape(B)}"))
    _check_shape(m, (in_f,), lambda: f"m_{tag}: expected shape (in_features={in_f},), got {_shape(m)}")
    return r


def _check_linear(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s):
    """Validate zip_lora_linear inputs; returns (out_features, in_features, r_c, r_s)."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype {FLOAT_DTYPES}, got {x.dtype}")
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
    x_msg = lambda: f"x: expected shape (..., in_features={in_f}), got {_shape(x)}"  # noqa: E731
    if x.dim() < 1:
        raise ValueError(x_msg())
    torch._check_with(ValueError, x.shape[-1] == in_f, x_msg)
    if bias is not None:
        _check_shape(bias, (out_f,), lambda: f"bias: expected shape (out_features={out_f},), got {_shape(bias)}")
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
            den = (mc.square().sum() * ms.square().sum()).clamp_min(ZIP_COS_EPS**2).sqrt()
            total = total + ((mc * ms).sum() / den).abs()
    return total


# ----------------------------------------------------------------------------- zip_merge(_lora)


def _check_merge(delta_c, delta_s, m_c, m_s):
    _check_shape(delta_c, (None, None), lambda: (
        f"delta_c: expected shape (out_features, in_features), got {_shape(delta_c)}"))
    out_f, in_f = delta_c.shape
    _check_shape(delta_s, (out_f, in_f), lambda: (
        f"delta_s: expected shape ({out_f}, {in_f}) like delta_c, got {_shape(delta_s)}"))
    for name, m in (("m_c", m_c), ("m_s", m_s)):
        _check_shape(m, (in_f,), lambda: f"{name}: expected shape (in_features={in_f},), got {_shape(m)}")
    for name, t in (("delta_s", delta_s), ("m_c", m_c), ("m_s", m_s)):
        if t.dtype != delta_c.dtype or t.device != delta_c.device:
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != delta_c's {delta_c.dtype}/{delta_c.device}")


def _check_merge_lora(B_c, A_c, B_s, A_s, m_c, m_s, scale_c=1.0, scale_s=1.0):
    if B_c.dim() != 2 or A_c.dim() != 2:
        raise ValueError(f"B_c, A_c: expected (out, r_c) and (r_c, in), got {_shape(B_c)} and {_shape(A_c)}")
    out_f, in_f = B_c.shape[0], A_c.shape[1]
    _check_lora("c", B_c, A_c, m_c, out_f, in_f)
    _check_lora("s", B_s, A_s, m_s, out_f, in_f)
    for name, t in dict(A_c=A_c, B_s=B_s, A_s=A_s, m_c=m_c, m_s=m_s).items():
        if t.dtype != B_c.dtype or t.device != B_c.device:
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != B_c's {B_c.dtype}/{B_c.device}")


def _merge_samples(device, dtype):
    """Square, wide and 1 x 1 updates; one transposed (non-contiguous) pair."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    out = [(mk(o, i), mk(o, i), mk(i), mk(i)) for o, i in ((4, 4), (2, 5), (1, 1))]
    out.append((mk(3, 4).t(), mk(3, 4).t(), mk(3), mk(3)))
    return out


def _merge_lora_samples(device, dtype):
    """Unequal ranks both ways, rank 1, out = in = 1; scales 1 and not."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    shapes = (((4, 3, 2, 1), (0.5, 2.0)), ((3, 5, 1, 3), (1.0, 1.0)), ((1, 1, 1, 1), (-1.5, 0.25)))
    return [(mk(o, r_c), mk(r_c, i), mk(o, r_s), mk(r_s, i), mk(i), mk(i), *scales)
            for (o, i, r_c, r_s), scales in shapes]


# Pure compositions of torch ops (bandwidth bound, one pass): autograd, fake tensors and
# torch.compile come from the decomposition, and every backend runs the same code.
zip_merge = declare(
    "zip_merge",
    "(Tensor delta_c, Tensor delta_s, Tensor m_c, Tensor m_s) -> Tensor",
    composite=zip_merge_reference,
    check=_check_merge,
    reference=zip_merge_reference,
    samples=_merge_samples,
    doc="""ΔW_m = ΔW_c diag(m_c) + ΔW_s diag(m_s): the dense merge (export, fusing into weights).

    Args:
        delta_c, delta_s: (out, in) updates; m_c, m_s: (in,) mergers, one per input column.
    Differentiable in all four. Raises ValueError on shape, dtype or device mismatches.
    """,
)

zip_merge_lora = declare(
    "zip_merge_lora",
    "(Tensor B_c, Tensor A_c, Tensor B_s, Tensor A_s, Tensor m_c, Tensor m_s, float scale_c=1.0, "
    "float scale_s=1.0) -> (Tensor, Tensor)",
    composite=zip_merge_lora_reference,
    check=_check_merge_lora,
    reference=zip_merge_lora_reference,
    samples=_merge_lora_samples,
    doc="""The merge as one exact LoRA of rank r_c + r_s: returns (B_m, A_m) with

        B_m = [B_c | B_s]  (out, r_c + r_s),   A_m = [s_c·A_c diag(m_c); s_s·A_s diag(m_s)]  (r_c + r_s, in),

    so B_m A_m = zip_merge(s_c B_c A_c, s_s B_s A_s, m_c, m_s) and the result loads anywhere a
    LoRA (with scale 1) loads. Differentiable. Raises ValueError on rank/width mismatches.
    """,
)


# ----------------------------------------------------------------------------- zip_lora_linear kernels
# A forward kernel maps (T, in) rows x2 and the op's other arguments to (T, out); a backward kernel
# takes `need` as {slot: bool} and returns {slot: gradient or None} (slots: GRAD_SLOTS).


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
    r_c = A_c.shape[0]
    Bp, Ap = _pack(B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)
    out = dict.fromkeys(GRAD_SLOTS)
    if need["x"] or need["A_c"] or need["A_s"] or need["m_c"] or need["m_s"]:
        u = g2 @ Bp
        if need["x"]:
            gx = g2 @ weight if weight is not None else None
            out["x"] = gx.addmm_(u, Ap) if gx is not None else u @ Ap
        if need["A_c"] or need["A_s"] or need["m_c"] or need["m_s"]:
            G = u.t() @ x2  # (r, in): the reduction over tokens
            for tag, A, m, s, Gk in (("c", A_c, m_c, scale_c, G[:r_c]), ("s", A_s, m_s, scale_s, G[r_c:])):
                if need["m_" + tag]:
                    out["m_" + tag] = (Gk * A).sum(0, dtype=acc_dtype(A.dtype)).mul_(s).to(A.dtype)
                if need["A_" + tag]:
                    out["A_" + tag] = Gk * (s * m)
    if need["B_c"] or need["B_s"]:
        gB = g2.t() @ (x2 @ Ap.t())  # h recomputed rather than kept from the forward
        out["B_c"], out["B_s"] = gB[:, :r_c], gB[:, r_c:]
    if need["weight"]:
        out["weight"] = g2.t() @ x2
    if need["bias"]:
        out["bias"] = g2.sum(0, dtype=acc_dtype(g2.dtype)).to(g2.dtype)
    return out


def _fwd_ext(x2, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s):
    return torch.ops.specops_ext.zip_lora_linear_fwd(x2, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)


def _bwd_ext(g2, x2, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    # one named flag in and one named output back per gradient (need_x -> grad_x, ...)
    op = torch.ops.specops_ext.zip_lora_linear_bwd.default
    grads = op(g2, x2, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s,
               **{"need_" + k: v for k, v in need.items()})
    named = dict(zip((r.name for r in op._schema.returns), grads))
    return {k: named["grad_" + k] if v else None for k, v in need.items()}


def _fwd_triton(*args):
    return triton_module("zip").zip_lora_linear_fwd(*args)


def _bwd_triton(*args):
    return triton_module("zip").zip_lora_linear_bwd(*args)


def _triton_supports(*args):
    A_c, A_s = args[4], args[7]  # in zip_lora_linear's arguments and its backward's alike
    return triton_module("zip").supports(A_c.shape[0] + A_s.shape[0], A_c.dtype)


def _rows(t: Tensor) -> Tensor:
    """(T, n) view of (..., n) with a contiguous last dim."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(kernel):
    """The op's kernel for a forward kernel on (T, in) rows."""

    def run(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s):
        y = kernel(_rows(x), weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s)
        return y.reshape(*x.shape[:-1], B_c.shape[0])

    return run


def _own(g: Tensor, shape) -> Tensor:
    """g as a contiguous tensor of `shape` that shares memory with no other output of the op.

    The B_c / B_s gradients are column slices of one buffer; a slice that counts as contiguous
    (out_features = 1, rank 0, no tokens) would come back from .contiguous() as an aliasing view,
    which a custom op may not return.
    """
    g2 = g.reshape(shape)
    return g2.clone(memory_format=torch.contiguous_format) if g._base is not None else g2.contiguous()


def _grad_shapes(x, weight, B_c, A_c, m_c, B_s, A_s, m_s) -> dict:
    w_shape = weight.shape if weight is not None else (0,)
    shapes = (x.shape, w_shape, (B_c.shape[0],), B_c.shape, A_c.shape, m_c.shape, B_s.shape, A_s.shape, m_s.shape)
    return dict(zip(GRAD_SLOTS, shapes))


def _backward_kernel(kernel):
    """The backward op's kernel: the gradients in GRAD_SLOTS order, empty (0,) where not needed."""

    def run(grad_y, x, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
        need = dict(zip(GRAD_SLOTS, need))
        grads = kernel(_rows(grad_y), _rows(x), weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need)
        shapes = _grad_shapes(x, weight, B_c, A_c, m_c, B_s, A_s, m_s)
        return [_own(grads[k], shapes[k]) if need[k] else x.new_empty(0) for k in GRAD_SLOTS]

    return run


def _kernels(wrap, torch_fn, ext_fn, triton_fn):
    """The backend kernels of zip_lora_linear (wrap=_forward) or of its backward (wrap=_backward_kernel)."""
    return {"torch": wrap(torch_fn), "cpp": wrap(ext_fn), "cuda": wrap(ext_fn),
            "triton": Kernel(wrap(triton_fn), supports=_triton_supports)}


def _check_backward(grad_y, x, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    _check_linear(x, weight, None, B_c, A_c, m_c, B_s, A_s, m_s)
    if len(need) != len(GRAD_SLOTS):
        raise ValueError(f"need: expected {len(GRAD_SLOTS)} flags, one per {GRAD_SLOTS}, got {len(need)}")
    if weight is None and need[GRAD_SLOTS.index("weight")]:
        raise ValueError("need: a weight gradient was asked for but weight is None")


def _backward_fake(grad_y, x, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    shapes = _grad_shapes(x, weight, B_c, A_c, m_c, B_s, A_s, m_s)
    return [x.new_empty(shapes[k]) if nd else x.new_empty(0) for k, nd in zip(GRAD_SLOTS, need)]


# ----------------------------------------------------------------------------- zip_lora_linear op

_zip_lora_linear_backward = declare(
    "zip_lora_linear_backward",
    "(Tensor grad_y, Tensor x, Tensor? weight, Tensor B_c, Tensor A_c, Tensor m_c, Tensor B_s, Tensor A_s, "
    "Tensor m_s, float scale_c, float scale_s, bool[] need) -> Tensor[]",
    kernels=_kernels(_backward_kernel, _bwd_torch, _bwd_ext, _bwd_triton),
    check=_check_backward,
    fake=_backward_fake,
)


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
    grads = _zip_lora_linear_backward(
        grad_y, x, weight if ctx.has_weight else None, B_c, A_c, m_c, B_s, A_s, m_s, *ctx.scales, ctx.need
    )
    return (*[g if nd else None for g, nd in zip(grads, ctx.need)], None, None)


def _linear_samples(device, dtype):
    """With and without weight / bias, unequal ranks, rank 1, out_features 1, leading dims, no tokens."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    out = []
    for batch, out_f, in_f, r_c, r_s, weight, bias in (
        ((4,), 5, 6, 2, 3, True, True),
        ((2, 3), 1, 4, 1, 1, False, True),
        ((3,), 3, 5, 4, 1, True, False),
        ((0,), 2, 3, 1, 2, False, False),
    ):
        W = mk(out_f, in_f) if weight else None
        b = mk(out_f) if bias else None
        loras = [t for r in (r_c, r_s) for t in (mk(out_f, r), mk(r, in_f), 1 + 0.5 * mk(in_f))]
        out.append((mk(*batch, in_f), W, b, *loras, 0.5, 2.0))
    return out


zip_lora_linear = declare(
    "zip_lora_linear",
    _LINEAR_SCHEMA,
    kernels=_kernels(_forward, _fwd_torch, _fwd_ext, _fwd_triton),
    check=lambda x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s: _check_linear(
        x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s),
    fake=lambda x, weight, bias, B_c, *_: x.new_empty(*x.shape[:-1], B_c.shape[0]),
    reference=zip_lora_linear_reference,
    backward="zip_lora_linear_backward",
    setup_context=_linear_setup_context,
    backward_fn=_linear_backward,
    samples=_linear_samples,
    tol_scale=4.0,  # the merger / A gradients sum over tokens and rank
    doc="""y = x W^T + b + s_c·(x diag(m_c)) A_c^T B_c^T + s_s·(x diag(m_s)) A_s^T B_s^T, no (out, in) intermediate.

    Args:
        x: (..., in). weight: (out, in) or None (adapter branch only). bias: (out,) or None.
        B_c: (out, r_c), A_c: (r_c, in), m_c: (in,); B_s, A_s, m_s likewise with rank r_s.
        scale_c, scale_s: the LoRAs' scales (alpha / r).
    Returns:
        (..., out) in x's dtype (bf16/fp16: GEMMs accumulate in fp32).

    Differentiable in every tensor argument; only the gradients asked for are computed (merger
    training asks for m_c, m_s only: two (T x r)-thin GEMMs, see the module docstring). The base
    GEMM uses torch's GEMM (MKL/oneDNN, cuBLAS); the adapter branch is fused per backend (Triton:
    r_c + r_s up to 64 in fp32, 128 in fp64/bf16/fp16). Raises ValueError naming the argument and
    the expected shape on rank/width mismatches between the LoRAs and the base layer, mergers of
    the wrong length, or mixed dtypes/devices.
    """,
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
    if ref.dtype not in FLOAT_DTYPES:
        raise ValueError(f"m_c_list[0]: expected a floating dtype {FLOAT_DTYPES}, got {ref.dtype}")
    for i, (mc, ms) in enumerate(zip(m_c_list, m_s_list)):
        if mc.dim() != 1:
            raise ValueError(f"m_c_list[{i}]: expected a 1-D (in_features,) vector, got {_shape(mc)}")
        _check_shape(ms, mc.shape, lambda: (
            f"m_s_list[{i}]: expected shape ({mc.shape[0]},) like m_c_list[{i}], got {_shape(ms)}"))
        for name, t in ((f"m_c_list[{i}]", mc), (f"m_s_list[{i}]", ms)):
            if t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != m_c_list[0]'s {ref.dtype}/{ref.device}")


def _penalty_parts(m_c_list, m_s_list, abs_terms, mean, norm_eps):
    """Flattened mergers (accumulation dtype), the layer of each entry, and per-layer S, D and the
    squared norms (None without norm_eps) of _PENALTY_MATH, all layers at once."""
    acc = acc_dtype(m_c_list[0].dtype)
    mc, ms = torch.cat(m_c_list).to(acc), torch.cat(m_s_list).to(acc)
    L = len(m_c_list)
    lengths = torch.tensor([m.shape[0] for m in m_c_list], device=mc.device)
    seg = torch.repeat_interleave(torch.arange(L, device=mc.device), lengths)

    def layer_sums(values):
        return values.new_zeros(L).index_add_(0, seg, values)

    p = mc * ms
    S = layer_sums(p.abs() if abs_terms else p)
    D = lengths.clamp_min(1).to(acc) if mean else torch.ones_like(S)
    norms = None
    if norm_eps is not None:
        norms = layer_sums(mc * mc), layer_sums(ms * ms)
        D = D * (norms[0] * norms[1]).clamp_min(norm_eps**2).sqrt()
    return mc, ms, seg, S, D, norms


def _penalty_fwd_torch(m_c_list, m_s_list, abs_terms, mean, norm_eps):
    _, _, _, S, D, _ = _penalty_parts(m_c_list, m_s_list, abs_terms, mean, norm_eps)
    return (S.abs() / D).sum()


def _penalty_bwd_torch(grad, m_c_list, m_s_list, abs_terms, mean, norm_eps):
    """d|S|/D: sign(S)/D dS (dS/dm_c = sign(p) m_s or m_s) minus |S|/D² dD, where dD/dm_c = D m_c/|m_c|²
    from the norm factor (zero where it is clamped)."""
    mc, ms, seg, S, D, norms = _penalty_parts(m_c_list, m_s_list, abs_terms, mean, norm_eps)
    w = (grad.to(mc.dtype) * torch.sign(S) / D)[seg]
    if abs_terms:
        w = w * torch.sign(mc * ms)
    if norms is None:
        return w * ms, w * mc
    nc, ns = norms
    clamped = nc * ns < norm_eps**2
    kc = torch.where(clamped, 0, S / nc.clamp_min(torch.finfo(nc.dtype).tiny))[seg]
    ks = torch.where(clamped, 0, S / ns.clamp_min(torch.finfo(ns.dtype).tiny))[seg]
    return w * (ms - kc * mc), w * (mc - ks * ms)


def _penalty_fwd_ext(m_c_list, m_s_list, abs_terms, mean, norm_eps):
    return torch.ops.specops_ext.merger_penalty_fwd(m_c_list, m_s_list, abs_terms=abs_terms, mean=mean,
                                                    norm_eps=norm_eps)


def _penalty_bwd_ext(grad, m_c_list, m_s_list, abs_terms, mean, norm_eps):
    return torch.ops.specops_ext.merger_penalty_bwd(grad, m_c_list, m_s_list, abs_terms=abs_terms, mean=mean,
                                                    norm_eps=norm_eps)


def _penalty_forward(kernel):
    def run(m_c_list, m_s_list, kind):
        return kernel(m_c_list, m_s_list, **_PENALTY_MATH[kind]).to(m_c_list[0].dtype)

    return run


def _penalty_backward_kernel(kernel):
    """The backward op's kernel: the gradients of all layers, concatenated (flat m_c, flat m_s)."""

    def run(grad, m_c_list, m_s_list, kind):
        gc, gs = kernel(grad, m_c_list, m_s_list, **_PENALTY_MATH[kind])
        dtype = m_c_list[0].dtype
        return gc.to(dtype), gs.to(dtype)

    return run


def _penalty_backward_fake(grad, m_c_list, m_s_list, kind):
    n = sum(m.shape[0] for m in m_c_list)
    return m_c_list[0].new_empty(n), m_c_list[0].new_empty(n)


_merger_penalty_backward = declare(
    "merger_penalty_backward",
    "(Tensor grad, Tensor[] m_c_list, Tensor[] m_s_list, str kind) -> (Tensor, Tensor)",
    kernels={"torch": _penalty_backward_kernel(_penalty_bwd_torch), "cpp": _penalty_backward_kernel(_penalty_bwd_ext)},
    check=lambda grad, m_c_list, m_s_list, kind: _check_penalty(m_c_list, m_s_list, kind),
    fake=_penalty_backward_fake,
)


def _penalty_setup_context(ctx, inputs, output):
    m_c_list, m_s_list, kind = inputs
    ctx.kind = kind
    ctx.L = len(m_c_list)
    ctx.sizes = [m.shape[0] for m in m_c_list]
    ctx.save_for_backward(*m_c_list, *m_s_list)


def _penalty_backward(ctx, grad):
    saved = ctx.saved_tensors
    gc, gs = _merger_penalty_backward(grad, list(saved[: ctx.L]), list(saved[ctx.L :]), ctx.kind)
    # One entry per argument the call passed: the dispatcher drops a kind equal to its default, and
    # torch's autograd for Tensor[] ops then expects no entry for it.
    return list(gc.split(ctx.sizes)), list(gs.split(ctx.sizes)), None


def _penalty_samples(device, dtype):
    """Every kind over layers of 3, 1 (cosine: 2) and 5 columns, and over a layer and an empty one.

    A 1-column layer has cos = ±1 and so a zero cosine gradient, which round-off cannot match relatively.
    """
    mk = lambda n: 1 + 0.5 * torch.randn(n, device=device, dtype=dtype)  # noqa: E731
    return [([mk(n) for n in sizes], [mk(n) for n in sizes], kind)
            for kind in PENALTY_KINDS for sizes in ((3, 2 if kind == "cosine" else 1, 5), (4, 0))]


merger_penalty = declare(
    "merger_penalty",
    '(Tensor[] m_c_list, Tensor[] m_s_list, str kind="abs_product") -> Tensor',
    kernels={"torch": _penalty_forward(_penalty_fwd_torch), "cpp": _penalty_forward(_penalty_fwd_ext)},
    check=_check_penalty,
    fake=lambda m_c_list, m_s_list, kind: m_c_list[0].new_empty(()),
    reference=merger_penalty_reference,
    backward="merger_penalty_backward",
    setup_context=_penalty_setup_context,
    backward_fn=_penalty_backward,
    samples=_penalty_samples,
    tol_scale=2.0,
    doc="""The merger regulariser summed over all layers, in one multi-tensor launch.

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
    """,
)


# ----------------------------------------------------------------------------- module


def _lora_parts(lora, tag: str):
    if not isinstance(lora, (tuple, list)) or len(lora) not in (2, 3):
        raise ValueError(f"{tag}: expected a (B, A) or (B, A, scale) tuple, got {type(lora).__name__}")
    B, A = lora[0], lora[1]
    return B.detach(), A.detach(), float(lora[2]) if len(lora) == 3 else 1.0
