"""Spectral-shift reconstruction: SVDiff, SODA-SVD and SODA-LQ weights as autograd-aware ops.

A frozen weight W0 (out, in) is decomposed once (`decompose`) as a thin SVD W0 = U diag(S) Vh or
as W0 = L Qh (L (out, k) lower-trapezoidal, Qh (k, in) with orthonormal rows), k = min(out, in).
Training moves a shift delta (k values) and, for SODA, a Kronecker rotation R = R_1 ⊗ ... ⊗ R_r:

    SVD:  W' = U diag(s) Vh,  s = act(S + delta),  act in {relu, softplus, none}
    LQ:   W' = (L + diag(delta)) Qh
    side="input":  W = W' R^T              (y = (x R) W'^T: the SODA authors' code), ∏ p_i = in
    side="basis":  W = U diag(s) (V R)^T   (the paper's equation; V = Vh^T),          ∏ p_i = k
                   W = (L + diag(delta)) (Qh^T R)^T for LQ.

Both sides are one product A B~ with a rotated basis B~ (k, in): B~ = Vh R^T (input side: each row
of Vh rotated, kron_matmul over rows of length in) or B~ = (V R)^T (basis side: kron_matmul over the
rows of V, length k). R itself is never formed: the rotation always goes through
`specops.kron_matmul`, on the basis (k or in rows) or on the activations (M rows).

The SVD product U diag(s) B~ is the op `scaled_matmul(A, s, B) = A diag(s) B`, whose backward is
fused: with T = A^T G (one (k, in) GEMM), grad_s = rowsum(T ⊙ B) and grad_B = diag(s) T share T;
when only grad_s is wanted, diag(A^T G B^T) is reduced block by block and no (k, in) intermediate
is stored. The rebuild formulations (torch autograd through U @ torch.diag(s) @ Vh) run two extra
k x k GEMMs and a second (k, in) product when the basis is trained.

`lowrank_linear(x, A, s, B, y) = y + ((x A^T) diag(s)) B^T` is the same product applied to
activations at a small rank r (AdaLoRA's update x (P diag(λ) Q)^T on its base output): its cpp
kernel does each pass in one sweep over blocks of rows with register tiles, where a library GEMM
with one dimension r runs at a fraction of the machine's FMA rate.

`spectral_linear` (the layer's forward, y = x W^T + b) chooses between two evaluation orders from
the shapes (M tokens, out, in, k, rotation sizes) and from which inputs need gradients:
  "materialise": W = A B~, then y = x W^T + b; backward G_W = grad_y^T x (torch's linear) and the
                 fused scaled_matmul backward.  ~ 4·M·out·in + 4·out·k·in FLOPs with delta trained.
  "factored":    y = ((x B~^T) ⊙ s) U^T + b (the rotation on x or on x Vh^T when M is smaller than
                 the basis); backward grad_s = colsum((grad_y U) ⊙ (x B~^T)) fused.
                 ~ 2·M·k·(in + 2·out) FLOPs with only delta trained.
Rule (`linear_path`): count the FLOPs of forward + backward of both orders (GEMMs and Kronecker
mode products, only for the gradients that are needed) and take the smaller; while autograd
records, the factored order keeps an (M, k) activation for the backward that the materialised one
does not, so it must also save FACTORED_MARGIN (10%) of the FLOPs to be chosen.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._constants import FLOAT_DTYPES, acc_dtype
from ._registry import Kernel, declare, triton_module
from .kron import kron_matmul, kron_reference

__all__ = [
    "SODA_TABLE",
    "LQFactors",
    "SVDFactors",
    "decompose",
    "kron_factor_sizes",
    "linear_path",
    "lora_linear",
    "lora_linear_reference",
    "lowrank_linear",
    "lowrank_linear_reference",
    "scaled_matmul",
    "scaled_matmul_reference",
    "spectral_linear",
    "spectral_linear_lq",
    "spectral_linear_lq_reference",
    "spectral_linear_reference",
    "spectral_shift",
    "spectral_shift_lq",
    "spectral_shift_lq_reference",
    "spectral_shift_reference",
]

ACTIVATIONS = ("relu", "softplus", "none")
SIDES = ("input", "basis")
PATHS = ("auto", "materialise", "factored")
# SODA's published factorisations (width -> rotation factor sizes).
SODA_TABLE = {640: (8, 8, 10), 1280: (4, 16, 20), 2048: (4, 8, 64), 768: (6, 8, 16)}
# The factored order must save this fraction of the FLOPs to be chosen while autograd records.
FACTORED_MARGIN = 0.9


# ----------------------------------------------------------------------------- factor sizes


def _splits(n: int, k: int, lo: int):
    """Every non-decreasing tuple of k integers >= lo whose product is n."""
    if k == 1:
        if n >= lo:
            yield (n,)
        return
    d = lo
    while d ** k <= n:
        if n % d == 0:
            for rest in _splits(n // d, k - 1, d):
                yield (d, *rest)
        d += 1


def kron_factor_sizes(
    n: int, k: int = 3, table: dict[int, Sequence[int]] | None = None, allow_ones: bool = False
) -> tuple[int, ...]:
    """k integers whose product is exactly n, as balanced as possible (ascending).

    Balanced: the largest factor is as small as possible, then the spread (largest - smallest);
    1280 -> (8, 10, 16). `table` (e.g. SODA_TABLE) overrides: an entry for n is returned as given
    after checking that it has k factors multiplying to n. Factors of 1 are only used with
    allow_ones=True (a prime n with k > 1 has no other factorisation).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive number of factors, got {k!r}")
    if table is not None and n in table:
        sizes = tuple(int(p) for p in table[n])
        if len(sizes) != k or math.prod(sizes) != n:
            raise ValueError(
                f"table[{n}]: expected {k} factors whose product is {n}, got {sizes} "
                f"(product {math.prod(sizes)})"
            )
        return sizes
    best = min(_splits(n, k, 1 if allow_ones or k == 1 else 2), key=lambda t: (t[-1], t[-1] - t[0]), default=None)
    if best is None:
        raise ValueError(
            f"n: {n} has no factorisation into k={k} factors >= 2 (it has fewer than {k} prime "
            f"factors); pass allow_ones=True for degenerate factors of size 1 or use a smaller k"
        )
    return best


# ----------------------------------------------------------------------------- decompose


class SVDFactors(NamedTuple):
    """W = U diag(S) Vh; `error` = ||W - U diag(S) Vh||_F / ||W||_F per matrix."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    error: Tensor


class LQFactors(NamedTuple):
    """W = L Qh; `error` = ||W - L Qh||_F / ||W||_F per matrix."""

    L: Tensor
    Qh: Tensor
    error: Tensor


def _signs(v: Tensor) -> Tensor:
    """±1 (never 0) with the sign of v."""
    return torch.where(v < 0, -1.0, 1.0).to(v.dtype)


def _rel_error(w: Tensor, approx: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w).clamp_min(
        torch.finfo(w.dtype).tiny
    )


def decompose(weight: Tensor, method: str = "svd", *, dtype: torch.dtype | None = None):
    """Factor a weight (..., out, in) once: thin SVD or LQ, batched over leading dims.

    method="svd": U (.., out, k), S (.., k) descending, Vh (.., k, in), k = min(out, in); signs
        fixed so that the entry of largest magnitude of every column of U is positive.
    method="lq": W^T = Q R (reduced QR), so W = L Qh with L = R^T (.., out, k) lower-trapezoidal and
        Qh = Q^T (.., k, in) with orthonormal rows; signs fixed so that diag(L) >= 0 (unique for a
        full-rank W).
    Computed in float32 whatever the weight's dtype (dtype=torch.float64 on request); the factors
    are returned in that dtype, with the relative Frobenius reconstruction error per matrix.
    """
    if method not in ("svd", "lq"):
        raise ValueError(f"method: expected 'svd' or 'lq', got {method!r}")
    if weight.dim() < 2 or weight.shape[-1] == 0 or weight.shape[-2] == 0:
        raise ValueError(f"weight: expected a (..., out, in) tensor with out, in >= 1, got shape {tuple(weight.shape)}")
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    w = weight.detach().to(dtype)
    if not torch.isfinite(w).all():
        raise ValueError("weight: contains NaN or Inf; it cannot be decomposed")
    if method == "svd":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        idx = U.abs().argmax(dim=-2, keepdim=True)
        sign = _signs(U.gather(-2, idx))  # (.., 1, k)
        U = U * sign
        Vh = Vh * sign.mT
        return SVDFactors(U, S, Vh, _rel_error(w, (U * S.unsqueeze(-2)) @ Vh))
    Q, R = torch.linalg.qr(w.mT)  # Q (.., in, k), R (.., k, out)
    sign = _signs(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-1)  # (.., k, 1)
    L = (R * sign).mT
    Qh = Q.mT * sign
    return LQFactors(L, Qh, _rel_error(w, L @ Qh))


# ----------------------------------------------------------------------------- scaled_matmul op


def _check_smm(A: Tensor, s: Tensor, B: Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or s.dim() != 1:
        raise ValueError(
            f"scaled_matmul: expected A (r, k), s (k,), B (k, c); got A {tuple(A.shape)}, "
            f"s {tuple(s.shape)}, B {tuple(B.shape)}"
        )
    k = A.shape[1]
    torch._check_with(ValueError, s.shape[0] == k, lambda: (
        f"s: expected shape ({k},) to match A {tuple(A.shape)}, got {tuple(s.shape)}"))
    torch._check_with(ValueError, B.shape[0] == k, lambda: (
        f"B: expected shape ({k}, c) to match A {tuple(A.shape)}, got {tuple(B.shape)}"))
    for name, t in (("s", s), ("B", B)):
        if t.dtype != A.dtype or t.device != A.device:
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != A's {A.dtype}/{A.device}")
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"A: expected a floating dtype {FLOAT_DTYPES}, got {A.dtype}")


def _check_smm_backward(grad, A, s, B, need_A, need_s, need_B):
    _check_smm(A, s, B)
    shape_msg = lambda: f"grad: expected shape ({A.shape[0]}, {B.shape[1]}), got {tuple(grad.shape)}"  # noqa: E731
    if grad.dim() != 2:
        raise ValueError(shape_msg())
    torch._check_with(ValueError, grad.shape[0] == A.shape[0], shape_msg)
    torch._check_with(ValueError, grad.shape[1] == B.shape[1], shape_msg)


def scaled_matmul_reference(A: Tensor, s: Tensor, B: Tensor) -> Tensor:
    """A diag(s) B in plain torch (differentiable by autograd)."""
    _check_smm(A, s, B)
    return (A * s) @ B


def _smm_fwd_torch(A, s, B):
    # Fold s into the smaller operand; low precision is scaled in fp32 and rounded once.
    acc = acc_dtype(A.dtype)
    if A.shape[0] <= B.shape[1]:
        return (A.to(acc) * s.to(acc)).to(A.dtype) @ B
    return A @ (B.to(acc) * s.to(acc)[:, None]).to(B.dtype)


def _smm_bwd_torch(G, A, s, B, need_A, need_s, need_B):
    acc = acc_dtype(A.dtype)
    gA = gs = gB = None
    if need_B:
        T = (A.mT @ G).to(acc)  # (k, c), shared by grad_s and grad_B
        if need_s:
            gs = (T * B.to(acc)).sum(1)
        gB = T * s.to(acc)[:, None]
    if need_A or (need_s and gs is None):
        P = (G @ B.mT).to(acc)  # (r, k)
        if gs is None and need_s:
            gs = (P * A.to(acc)).sum(0)
        if need_A:
            gA = P * s.to(acc)
    return gA, gs, gB


def _smm_fwd_ext(A, s, B):
    return torch.ops.specops_ext.scaled_matmul_fwd(A, s, B)


def _smm_bwd_ext(G, A, s, B, need_A, need_s, need_B):
    gA, gs, gB = torch.ops.specops_ext.scaled_matmul_bwd(G, A, s, B, need_A, need_s, need_B)
    return (gA if need_A else None), (gs if need_s else None), (gB if need_B else None)


def _smm_fwd_triton(A, s, B):
    return triton_module("spectral").scaled_matmul_fwd(A, s, B)


def _smm_bwd_triton(G, A, s, B, need_A, need_s, need_B):
    return triton_module("spectral").scaled_matmul_bwd(G, A, s, B, need_A, need_s, need_B)


def _smm_backward_kernel(kernel):
    """The backward op's kernel: [grad_A, grad_s, grad_B], an entry not asked for an empty tensor."""

    def run(grad, A, s, B, need_A, need_s, need_B):
        outs = kernel(grad, A, s, B, need_A, need_s, need_B)
        return [A.new_empty(0) if g is None else g.to(t.dtype) for g, t in zip(outs, (A, s, B))]

    return run


def _smm_backward_fake(grad, A, s, B, need_A, need_s, need_B):
    return [t.new_empty(t.shape) if need else t.new_empty(0) for t, need in ((A, need_A), (s, need_s), (B, need_B))]


_scaled_matmul_backward = declare(
    "scaled_matmul_backward",
    "(Tensor grad, Tensor A, Tensor s, Tensor B, bool need_A, bool need_s, bool need_B) -> Tensor[]",
    kernels={"torch": _smm_backward_kernel(_smm_bwd_torch), "cpp": _smm_backward_kernel(_smm_bwd_ext),
             "triton": _smm_backward_kernel(_smm_bwd_triton)},
    check=_check_smm_backward,
    fake=_smm_backward_fake,
)


def _smm_setup_context(ctx, inputs, output):
    A, s, B = inputs
    ctx.needs = (A.requires_grad, s.requires_grad, B.requires_grad)
    ctx.save_for_backward(A, s, B)


def _smm_backward(ctx, grad):
    A, s, B = ctx.saved_tensors
    if not any(ctx.needs):
        return None, None, None
    out = _scaled_matmul_backward(grad, A, s, B, *ctx.needs)
    return tuple(g if need else None for g, need in zip(out, ctx.needs))


def _smm_samples(device, dtype):
    """Square and not, k = 1, a single entry, no rows, and transposed (strided) A and B."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    out = [(mk(r, k), mk(k), mk(k, c)) for r, k, c in ((4, 4, 4), (5, 3, 7), (7, 3, 2), (4, 1, 6), (1, 1, 1),
                                                        (0, 3, 4))]
    return out + [(mk(3, 5).mT, mk(6)[::2], mk(4, 3).mT)]


scaled_matmul = declare(
    "scaled_matmul",
    "(Tensor A, Tensor s, Tensor B) -> Tensor",
    kernels={"torch": _smm_fwd_torch, "cpp": _smm_fwd_ext, "triton": _smm_fwd_triton},
    check=_check_smm,
    fake=lambda A, s, B: A.new_empty((A.shape[0], B.shape[1])),
    reference=scaled_matmul_reference,
    backward="scaled_matmul_backward",
    setup_context=_smm_setup_context,
    backward_fn=_smm_backward,
    samples=_smm_samples,
    doc="""A diag(s) B for A (r, k), s (k,), B (k, c), the spectrum folded into the GEMM.

    Differentiable in A, s and B. The backward forms T = A^T G once when B needs its gradient
    (grad_s = rowsum(T ⊙ B), grad_B = diag(s) T) and otherwise reduces diag(A^T G B^T) block by
    block without storing a (k, c) or (r, k) intermediate (cpp, triton backends).
    """,
)


# ----------------------------------------------------------------------------- lowrank_linear op

LOWRANK_MAX_RANK = 24  # the cpp kernel beats library GEMMs below this; level by r ~ 32 (fp32, 1280 wide, 2 threads)


def _check_lowrank(x: Tensor, A: Tensor, s: Tensor, B: Tensor, y: Tensor | None) -> None:
    """lowrank_linear's operands (y None: all but y, for lora_linear)."""
    if x.dim() != 2 or A.dim() != 2 or s.dim() != 1 or B.dim() != 2 or (y is not None and y.dim() != 2):
        raise ValueError(
            f"lowrank_linear: expected x (T, n), A (r, n), s (r,), B (m, r), y (T, m); got x {tuple(x.shape)}, "
            f"A {tuple(A.shape)}, s {tuple(s.shape)}, B {tuple(B.shape)}, y {None if y is None else tuple(y.shape)}"
        )
    r, n = A.shape
    for name, t, want in (("x", x, (x.shape[0], n)), ("s", s, (r,)), ("B", B, (B.shape[0], r)),
                          ("y", y, (x.shape[0], B.shape[0]))):
        if t is not None:
            torch._check_with(ValueError, t.shape == want, lambda name=name, t=t, want=want: (
                f"{name}: expected shape {tuple(want)} to match A {tuple(A.shape)}, got {tuple(t.shape)}"))
    for name, t in (("A", A), ("s", s), ("B", B), ("y", y)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != x's {x.dtype}/{x.device}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype {FLOAT_DTYPES}, got {x.dtype}")


def _check_lowrank_backward(grad, x, A, s, B, need_x, need_A, need_s, need_B):
    _check_lowrank(x, A, s, B, grad)


def lowrank_linear_reference(x: Tensor, A: Tensor, s: Tensor, B: Tensor, y: Tensor) -> Tensor:
    """y + ((x Aᵀ) diag(s)) Bᵀ in plain torch (differentiable by autograd)."""
    _check_lowrank(x, A, s, B, y)
    return y + ((x @ A.mT) * s) @ B.mT


def _lrl_fwd_torch(x, A, s, B, y):
    return torch.addmm(y, (x @ A.mT) * s, B.mT)  # s on the (T, r) product, the smallest operand


def _lrl_bwd_torch(G, x, A, s, B, need_x, need_A, need_s, need_B):
    gx = gA = gs = gB = None
    U = G @ B if need_x or need_A or need_s else None  # (T, r)
    h = x @ A.mT if need_s or need_B else None  # (T, r), recomputed: nothing (T, r) is saved
    if need_s:
        acc = acc_dtype(x.dtype)
        gs = (U.to(acc) * h.to(acc)).sum(0)
    if need_B:
        gB = G.mT @ (h * s)
    if need_x or need_A:
        g = U * s
        gx = g @ A if need_x else None
        gA = g.mT @ x if need_A else None
    return gx, gA, gs, gB


def _lrl_supports(x, A, *args):
    if x.dtype not in (torch.float32, torch.float64):
        return f"float32 / float64 only, got {x.dtype} (the torch kernel's GEMMs take the rest)"
    if A.shape[0] > LOWRANK_MAX_RANK:
        return f"rank {A.shape[0]} > {LOWRANK_MAX_RANK}: library GEMMs are efficient there"
    return None


def _lrl_bwd_ext(G, x, A, s, B, need_x, need_A, need_s, need_B):
    outs = torch.ops.specops_ext.lowrank_linear_bwd(G, x, A, s, B, need_x, need_A, need_s, need_B)
    return tuple(g if need else None for g, need in zip(outs, (need_x, need_A, need_s, need_B)))


def _lrl_backward_kernel(kernel):
    """The backward op's kernel: [grad_x, grad_A, grad_s, grad_B], one not asked for an empty tensor."""

    def run(grad, x, A, s, B, need_x, need_A, need_s, need_B):
        outs = kernel(grad, x, A, s, B, need_x, need_A, need_s, need_B)
        return [x.new_empty(0) if g is None else g.to(t.dtype) for g, t in zip(outs, (x, A, s, B))]

    return run


def _lrl_backward_fake(grad, x, A, s, B, *needs):
    return [t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip((x, A, s, B), needs)]


_lowrank_linear_backward = declare(
    "lowrank_linear_backward",
    "(Tensor grad, Tensor x, Tensor A, Tensor s, Tensor B, bool need_x, bool need_A, bool need_s, bool need_B) "
    "-> Tensor[]",
    kernels={"torch": _lrl_backward_kernel(_lrl_bwd_torch),
             "cpp": Kernel(_lrl_backward_kernel(_lrl_bwd_ext), lambda G, x, A, *a: _lrl_supports(x, A))},
    check=_check_lowrank_backward,
    fake=_lrl_backward_fake,
)


def _lrl_setup_context(ctx, inputs, output):
    x, A, s, B, y = inputs
    ctx.needs = tuple(t.requires_grad for t in inputs)
    ctx.save_for_backward(x, A, s, B)


def _lrl_backward(ctx, grad):
    x, A, s, B = ctx.saved_tensors
    out = [None] * 4
    if any(ctx.needs[:4]):
        out = _lowrank_linear_backward(grad, x, A, s, B, *ctx.needs[:4])
    return (*(g if need else None for g, need in zip(out, ctx.needs)), grad if ctx.needs[4] else None)


def _lrl_samples(device, dtype):
    """Odd sizes around the register tiles (4 rows, 2 / 4 ranks, one or two vectors of columns), r = 1,
    no rows, rank 0, and strided (transposed) x, A, B and y."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    out = [(mk(T, n), mk(r, n), mk(r), mk(m, r), mk(T, m))
           for T, n, m, r in ((7, 37, 19, 5), (33, 20, 40, 12), (1, 3, 2, 1), (0, 4, 3, 2), (3, 5, 4, 0))]
    return out + [(mk(9, 6).mT, mk(9, 3).mT, mk(3), mk(3, 5).mT, mk(5, 6).mT)]


lowrank_linear = declare(
    "lowrank_linear",
    "(Tensor x, Tensor A, Tensor s, Tensor B, Tensor y) -> Tensor",
    kernels={"torch": _lrl_fwd_torch,
             "cpp": Kernel(lambda *a: torch.ops.specops_ext.lowrank_linear_fwd(*a), _lrl_supports)},
    check=_check_lowrank,
    fake=lambda x, A, s, B, y: y.new_empty(y.shape),
    reference=lowrank_linear_reference,
    backward="lowrank_linear_backward",
    setup_context=_lrl_setup_context,
    backward_fn=_lrl_backward,
    samples=_lrl_samples,
    doc="""y + ((x Aᵀ) diag(s)) Bᵀ for x (T, n), A (r, n), s (r,), B (m, r), y (T, m): a rank-r update
    (AdaLoRA's x ↦ x (P diag(λ) Q)ᵀ, LoRA's with s = its scale) added onto a base output y.

    Differentiable in x, A, s, B and y. With G = dL/dout, u = G B and h = x Aᵀ: grad_s = colsum(u ⊙ h),
    grad_B = Gᵀ h diag(s), grad_A = (u diag(s))ᵀ x, grad_x = u diag(s) A, grad_y = G. ΔW = B diag(s) A
    is never formed, nor any (T, r) product kept for the backward (h is recomputed). The cpp kernel
    (float32 / float64, r <= LOWRANK_MAX_RANK, else the torch kernel) makes one pass over blocks of
    rows for the forward and one for the backward, with register tiles whose work is proportional to
    r: 2·T·r·(n + m) FLOPs
    forward, 2·T·r·(3n + 2m) backward with every gradient, and one read of x, y (forward), G and x
    (backward); library GEMMs of such skinny shapes run far below the machine's FMA rate.
    """,
)


# ----------------------------------------------------------------------------- lora_linear op


def _check_lora(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, s: Tensor, B: Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"lora_linear: expected W (m, n), got {tuple(W.shape)}")
    _check_lowrank(x, A, s, B, None)
    torch._check_with(ValueError, W.shape[1] == x.shape[1] and W.shape[0] == B.shape[0], lambda: (
        f"W: expected shape ({B.shape[0]}, {x.shape[1]}) to match B {tuple(B.shape)} and x {tuple(x.shape)}, "
        f"got {tuple(W.shape)}"))
    for name, t in (("W", W), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} != x's {x.dtype}/{x.device}")
    if bias is not None:
        torch._check_with(ValueError, bias.dim() == 1 and bias.shape[0] == W.shape[0], lambda: (
            f"bias: expected shape ({W.shape[0]},), got {tuple(bias.shape)}"))


def lora_linear_reference(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, s: Tensor, B: Tensor) -> Tensor:
    """x Wᵀ + bias + ((x Aᵀ) diag(s)) Bᵀ in plain torch (differentiable by autograd)."""
    _check_lora(x, W, bias, A, s, B)
    y = x @ W.mT + ((x @ A.mT) * s) @ B.mT
    return y if bias is None else y + bias


def _lora_fwd_torch(x, W, bias, A, s, B):
    return F.linear(x, W, bias).addmm_((x @ A.mT) * s, B.mT)  # into the base output: one (T, m) allocation


def _lora_bwd_torch(G, x, W, A, s, B, need_x, need_W, need_bias, need_A, need_s, need_B):
    gx, gA, gs, gB = _lrl_bwd_torch(G, x, A, s, B, need_x, need_A, need_s, need_B)
    gx = None if gx is None else gx.addmm_(G, W)
    return gx, G.mT @ x if need_W else None, G.sum(0) if need_bias else None, gA, gs, gB


def _lora_bwd_ext(G, x, W, A, s, B, *needs):
    outs = torch.ops.specops_ext.lora_linear_bwd(G, x, W, A, s, B, *needs)
    return tuple(g if need else None for g, need in zip(outs, needs))


def _lora_backward_kernel(kernel):
    """The backward op's kernel: [grad_x, grad_W, grad_bias, grad_A, grad_s, grad_B], empty where not asked for."""

    def run(grad, x, W, A, s, B, *needs):
        outs = kernel(grad, x, W, A, s, B, *needs)
        return [x.new_empty(0) if g is None else g.to(x.dtype) for g in outs]

    return run


def _lora_backward_fake(grad, x, W, A, s, B, *needs):
    shapes = (x.shape, W.shape, W.shape[:1], A.shape, s.shape, B.shape)
    return [x.new_empty(sh if need else (0,)) for sh, need in zip(shapes, needs)]


_lora_linear_backward = declare(
    "lora_linear_backward",
    "(Tensor grad, Tensor x, Tensor W, Tensor A, Tensor s, Tensor B, bool need_x, bool need_W, bool need_bias, "
    "bool need_A, bool need_s, bool need_B) -> Tensor[]",
    kernels={"torch": _lora_backward_kernel(_lora_bwd_torch),
             "cpp": Kernel(_lora_backward_kernel(_lora_bwd_ext), lambda G, x, W, A, *a: _lrl_supports(x, A))},
    check=lambda grad, x, W, A, s, B, *needs: _check_lora(x, W, None, A, s, B),
    fake=_lora_backward_fake,
)


def _lora_setup_context(ctx, inputs, output):
    x, W, bias, A, s, B = inputs
    ctx.needs = tuple(t is not None and t.requires_grad for t in inputs)
    ctx.save_for_backward(x, W, A, s, B)


def _lora_backward(ctx, grad):
    x, W, A, s, B = ctx.saved_tensors
    out = [None] * 6
    if any(ctx.needs):
        out = _lora_linear_backward(grad, x, W, A, s, B, *ctx.needs)
    return tuple(g if need else None for g, need in zip(out, ctx.needs))


def _lora_samples(device, dtype):
    """lowrank_linear's shapes with a base weight, with and without bias, and a transposed x, W and B."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    out = [(mk(T, n), mk(m, n), mk(m) if i % 2 == 0 else None, mk(r, n), mk(r), mk(m, r))
           for i, (T, n, m, r) in enumerate(((7, 37, 19, 5), (33, 20, 40, 12), (1, 3, 2, 1), (0, 4, 3, 2), (3, 5, 4, 0)))]
    return out + [(mk(6, 9).mT, mk(6, 5).mT, mk(5), mk(3, 6), mk(3), mk(3, 5).mT)]


lora_linear = declare(
    "lora_linear",
    "(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor s, Tensor B) -> Tensor",
    kernels={"torch": _lora_fwd_torch,
             "cpp": Kernel(lambda *a: torch.ops.specops_ext.lora_linear_fwd(*a), lambda x, W, b, A, *a: _lrl_supports(x, A))},
    check=_check_lora,
    fake=lambda x, W, bias, A, s, B: x.new_empty(x.shape[0], W.shape[0]),
    reference=lora_linear_reference,
    backward="lora_linear_backward",
    setup_context=_lora_setup_context,
    backward_fn=_lora_backward,
    samples=_lora_samples,
    doc="""x Wᵀ + bias + ((x Aᵀ) diag(s)) Bᵀ for x (T, n), W (m, n), bias (m,) or None, A (r, n), s (r,),
    B (m, r): a Linear layer and its rank-r update (LoRA's, AdaLoRA's) in one op.

    lowrank_linear(x, A, s, B, F.linear(x, W, bias)) computed with one (T, m) output instead of two: the
    base GEMM allocates it and the update is added into it (a fresh tensor of that size costs more in
    page faults than the update's arithmetic). The backward adds the update's part of grad_x into G W
    the same way. Differentiable in every tensor: grad_x = G W + (G B diag(s)) A, grad_W = Gᵀ x,
    grad_bias = colsum(G), and lowrank_linear's grad_A, grad_s, grad_B. The cpp kernel: lowrank_linear's
    register tiles (float32 / float64, r <= LOWRANK_MAX_RANK), the base GEMMs through at::mm.
    """,
)


# ----------------------------------------------------------------------------- checks


def _check_rotation(rotation, dim: int, side: str, what: str, dtype, device) -> list[Tensor]:
    if rotation is None:
        return []
    if isinstance(rotation, Tensor) or not isinstance(rotation, (list, tuple)) or len(rotation) == 0:
        raise ValueError("rotation: expected None or a non-empty list of square (p_i, p_i) factors")
    for i, f in enumerate(rotation):
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != f.shape[1]:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"rotation[{i}]: expected a square (p, p) factor, got {shape}")
        if f.dtype != dtype or f.device != device:
            raise ValueError(f"rotation[{i}]: dtype/device {f.dtype}/{f.device} != {dtype}/{device}")
    sizes = tuple(f.shape[0] for f in rotation)
    if math.prod(sizes) != dim:
        raise ValueError(
            f"rotation: side={side!r} rotates {what}, so the factor sizes must multiply to {dim}; "
            f"got {sizes} (product {math.prod(sizes)})"
        )
    return list(rotation)


def _check_common(side, activation=None):
    if side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def _check_tensors(named: dict[str, Tensor]) -> None:
    first_name, first = next(iter(named.items()))
    if first.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{first_name}: expected a floating dtype {FLOAT_DTYPES}, got {first.dtype}")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{name}: dtype/device {t.dtype}/{t.device} != {first_name}'s {first.dtype}/{first.device}"
            )


def _check_pair(left: tuple[str, Tensor], basis: tuple[str, Tensor], shifts: dict[str, Tensor], rotation, side,
                directions: str):
    """Validate a factorisation left (out, k) · basis (k, in) with (k,) shifts; returns (out, in, k, factors)."""
    (a, A), (b, Bh) = left, basis
    if A.dim() != 2:
        raise ValueError(f"{a}: expected an (out, k) matrix, got shape {tuple(A.shape)}")
    out, k = A.shape
    if Bh.dim() != 2 or Bh.shape[0] != k:
        raise ValueError(f"{b}: expected shape ({k}, in) to match {a} {tuple(A.shape)}, got {tuple(Bh.shape)}")
    n = Bh.shape[1]
    if k > min(out, n):
        raise ValueError(
            f"{a}: k={k} columns exceed min(out, in) = {min(out, n)} ({a} {tuple(A.shape)}, {b} {tuple(Bh.shape)})"
        )
    for name, t in shifts.items():
        if t.shape != (k,):
            raise ValueError(f"{name}: expected shape ({k},) to match {a} {tuple(A.shape)}, got {tuple(t.shape)}")
    _check_tensors({a: A, b: Bh, **shifts})
    dim, what = (n, "the input features") if side == "input" else (k, f"the k {directions} directions")
    return out, n, k, _check_rotation(rotation, dim, side, what, A.dtype, A.device)


def _check_svd(U, S, Vh, delta, rotation, side, activation):
    """Validate the SVD inputs; returns (out, in, k, factors)."""
    _check_common(side, activation)
    return _check_pair(("U", U), ("Vh", Vh), {"S": S, "delta": delta}, rotation, side, "singular")


def _check_lq(L, Qh, delta, rotation, side):
    _check_common(side)
    return _check_pair(("L", L), ("Qh", Qh), {"delta": delta}, rotation, side, "basis")


def _check_x(x, bias, out, n, ref_name: str, ref: Tensor):
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"x: expected shape (..., {n}) (in_features = {n}), got {tuple(x.shape)}")
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias: expected shape ({out},), got {tuple(bias.shape)}")
    _check_tensors({ref_name: ref, "x": x, "bias": bias})


# ----------------------------------------------------------------------------- shared pieces


def _autocast(fn):
    """Under torch.autocast, fn computes like the matmuls it stands for (F.linear, U diag(s) Vh): every
    floating input but float64 cast to the autocast dtype, the body run with autocast off (the ops it
    calls take one dtype and would otherwise meet inputs that autocast rounded and others it did not)."""

    def cast(t, dtype):
        if isinstance(t, (list, tuple)):
            return [cast(f, dtype) for f in t]
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        if first is None or not torch.is_autocast_enabled(first.device.type):
            return fn(*args, **kwargs)
        device = first.device.type
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return fn(*(cast(a, dtype) for a in args), **{k: cast(v, dtype) for k, v in kwargs.items()})

    return run


def _activate(S: Tensor, delta: Tensor, activation: str) -> Tensor:
    z = S + delta
    if activation == "relu":
        return F.relu(z)
    if activation == "softplus":
        return F.softplus(z)
    return z


def _rotated_basis(Bh: Tensor, factors: list[Tensor], side: str) -> Tensor:
    """B~ (k, in): Bh R^T (input side) or (Bh^T R)^T (basis side), through kron_matmul."""
    if not factors:
        return Bh
    if side == "input":
        return kron_matmul(Bh, [f.mT for f in factors])
    return kron_matmul(Bh.mT, factors).mT


def _lq_weight(L: Tensor, delta: Tensor, B: Tensor) -> Tensor:
    # (L + diag(delta)) B = L B + diag(delta) B: the shift only scales the first k rows of B, an
    # O(k·in) term whose gradient (rowsum(G ⊙ B)) needs no GEMM.
    out, k = L.shape
    shift = F.pad(delta[:, None] * B, (0, 0, 0, out - k))
    return torch.addmm(shift, L, B)


# ----------------------------------------------------------------------------- shift ops


def spectral_shift_reference(U, S, Vh, delta, *, rotation=None, side="input", activation="relu"):
    """The formula in plain torch with the dense R = kron(R_1, ..., R_r) (the test oracle)."""
    _, _, _, factors = _check_svd(U, S, Vh, delta, rotation, side, activation)
    s = _activate(S, delta, activation)
    if not factors:
        return U @ torch.diag(s) @ Vh
    R = kron_reference(factors)
    if side == "input":
        return U @ torch.diag(s) @ Vh @ R.mT
    return U @ torch.diag(s) @ (Vh.mT @ R).mT


@_autocast
def spectral_shift(
    U: Tensor,
    S: Tensor,
    Vh: Tensor,
    delta: Tensor,
    *,
    rotation: Sequence[Tensor] | None = None,
    side: str = "input",
    activation: str = "relu",
) -> Tensor:
    """W = U diag(act(S + delta)) Vh, rotated by R = R_1 ⊗ ... ⊗ R_r when factors are given.

    side="input": W = W' R^T (∏ p_i = in); side="basis": W = U diag(s) (V R)^T (∏ p_i = k).
    U (out, k), S (k,), Vh (k, in), delta (k,), k <= min(out, in); activation relu | softplus |
    none. Differentiable in every input, R is never formed. Raises ValueError on mismatched shapes,
    factor sizes whose product is not the rotated dimension, or an unknown side/activation. Under
    torch.autocast the inputs (float64 excepted) are cast to the autocast dtype, as for a matmul.
    """
    _, _, _, factors = _check_svd(U, S, Vh, delta, rotation, side, activation)
    return scaled_matmul(U, _activate(S, delta, activation), _rotated_basis(Vh, factors, side))


def spectral_shift_lq_reference(L, Qh, delta, *, rotation=None, side="input"):
    """(L + diag(delta)) Qh [rotated] in plain torch with the dense R (the test oracle)."""
    _, _, k, factors = _check_lq(L, Qh, delta, rotation, side)
    D = torch.zeros_like(L)
    D[torch.arange(k), torch.arange(k)] = delta
    if not factors:
        return (L + D) @ Qh
    R = kron_reference(factors)
    return (L + D) @ (Qh @ R.mT if side == "input" else (Qh.mT @ R).mT)


@_autocast
def spectral_shift_lq(
    L: Tensor, Qh: Tensor, delta: Tensor, *, rotation: Sequence[Tensor] | None = None, side: str = "input"
) -> Tensor:
    """W = (L + diag(delta)) Qh (SODA-LQ), rotated like `spectral_shift`.

    L (out, k), Qh (k, in), delta (k,). side="input": W = W' R^T (∏ p_i = in); side="basis":
    W = (L + diag(delta)) (Qh^T R)^T (∏ p_i = k). Differentiable in every input.
    """
    _, _, _, factors = _check_lq(L, Qh, delta, rotation, side)
    return _lq_weight(L, delta, _rotated_basis(Qh, factors, side))


# ----------------------------------------------------------------------------- the path rule


def linear_path(
    M: int,
    out: int,
    n: int,
    k: int,
    *,
    rotation_sizes: Sequence[int] = (),
    side: str = "input",
    lq: bool = False,
    need: dict[str, bool] | None = None,
) -> tuple[str, dict[str, float]]:
    """("materialise" | "factored", {path: FLOPs of forward + backward}) for y = x W^T + b.

    `need` says which inputs need gradients (keys x, left (U or L), spectrum (S or delta), basis
    (Vh or Qh), rotation); default: the training case, delta and the rotation. A Kronecker pass over
    `rows` rows of width w costs 2·rows·w·Σp_i, its backward twice that for the factors.
    """
    need = {"spectrum": True, "rotation": bool(rotation_sizes), **(need or {})}
    nx, nl, ns, nb = (bool(need.get(key)) for key in ("x", "left", "spectrum", "basis"))
    nr = bool(need.get("rotation")) and bool(rotation_sizes)
    sp = float(sum(rotation_sizes))

    def kron(rows, width, fwd=True, factors=False, inp=False):  # forward, factor grads, input grad
        return 2.0 * rows * width * sp * (fwd + 2 * factors + inp)

    # materialise: B~ = rot(basis) (k·in elements either side), W = A B~, y = x W^T + b.
    wgemm = 2.0 * out * k * n
    mat = kron(k, n, factors=nr, inp=nb) + wgemm + 2.0 * M * out * n * (1 + nx)
    nbt = nb or nr  # the rotated basis needs its gradient
    if nl or ns or nbt:
        mat += 2.0 * M * out * n  # G_W = grad_y^T x
        if lq:  # grad_delta = rowsum(G_W ⊙ B~) is elementwise
            mat += wgemm * (nbt + nl)
        else:  # scaled_matmul backward: T = U^T G_W when B~ needs it, P = G_W B~^T for U
            mat += wgemm * (nbt + (nl or (ns and not nbt)))

    # factored: z = x B~^T (M, k), y = (z ⊙ s) U^T (or z (L + diag delta)^T) + b.
    zgemm, ygemm = 2.0 * M * k * n, 2.0 * M * k * out
    need_z = nx or nb or nr
    fac = zgemm + ygemm
    if lq:
        fac += ygemm * (need_z + nl)
    else:
        fac += ygemm * (nl + (need_z or (ns and not nl)))
    if side == "basis":  # z = rot(x Vh^T): the rotation acts on M activations of width k
        fac += kron(M, k, factors=nr, inp=nx or nb) + zgemm * (nx + nb)
    elif M < k:  # z = rot(x) Vh^T
        fac += kron(M, n, factors=nr, inp=nx) + zgemm * ((nx or nr) + nb)
    else:  # z = x rot(Vh)^T
        fac += kron(k, n, factors=nr, inp=nb) + zgemm * (nx + (nb or nr))
    grads = nx or nl or ns or nb or nr
    flops = {"materialise": mat, "factored": fac}
    margin = FACTORED_MARGIN if grads else 1.0
    return ("factored" if fac < margin * mat else "materialise"), flops


def _pick_path(path, x, left, spectrum, basis, factors, side, lq):
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    out, k = left.shape
    need = {
        "x": x.requires_grad,
        "left": left.requires_grad,
        "spectrum": any(t.requires_grad for t in spectrum),
        "basis": basis.requires_grad,
        "rotation": any(f.requires_grad for f in factors),
    }
    if not torch.is_grad_enabled():
        need = dict.fromkeys(need, False)
    M = x.numel() // max(x.shape[-1], 1)
    return linear_path(M, out, basis.shape[1], k, rotation_sizes=[f.shape[0] for f in factors], side=side,
                       lq=lq, need=need)[0]


def _factored_z(x2: Tensor, Bh: Tensor, factors: list[Tensor], side: str) -> Tensor:
    """z = x B~^T (M, k) with the rotation on the shorter of the activations and the basis."""
    if not factors:
        return x2 @ Bh.mT
    if side == "basis":
        return kron_matmul(x2 @ Bh.mT, factors)
    if x2.shape[0] < Bh.shape[0]:
        return kron_matmul(x2, factors) @ Bh.mT
    return x2 @ _rotated_basis(Bh, factors, side).mT


# ----------------------------------------------------------------------------- linear ops


def spectral_linear_reference(x, U, S, Vh, delta, bias=None, *, rotation=None, side="input", activation="relu"):
    """F.linear(x, spectral_shift_reference(...), bias) (the test oracle)."""
    W = spectral_shift_reference(U, S, Vh, delta, rotation=rotation, side=side, activation=activation)
    return F.linear(x, W, bias)


@_autocast
def spectral_linear(
    x: Tensor,
    U: Tensor,
    S: Tensor,
    Vh: Tensor,
    delta: Tensor,
    bias: Tensor | None = None,
    *,
    rotation: Sequence[Tensor] | None = None,
    side: str = "input",
    activation: str = "relu",
    path: str = "auto",
) -> Tensor:
    """y = x W^T + bias with W = spectral_shift(U, S, Vh, delta, rotation, side, activation).

    x (..., in) -> (..., out). `path` "auto" applies the rule of `linear_path` (materialise W then
    one GEMM, or the factored ((x B~^T) ⊙ s) U^T); "materialise" / "factored" force one. R is never
    formed. Differentiable in x, U, S, Vh, delta, bias and every rotation factor. Under torch.autocast
    it computes like F.linear: every input but float64 ones cast to the autocast dtype.
    """
    out, n, k, factors = _check_svd(U, S, Vh, delta, rotation, side, activation)
    _check_x(x, bias, out, n, "U", U)
    s = _activate(S, delta, activation)
    if _pick_path(path, x, U, (S, delta), Vh, factors, side, lq=False) == "materialise":
        return F.linear(x, scaled_matmul(U, s, _rotated_basis(Vh, factors, side)), bias)
    x2 = x.reshape(-1, n)
    y = scaled_matmul(_factored_z(x2, Vh, factors, side), s, U.mT)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out)


def spectral_linear_lq_reference(x, L, Qh, delta, bias=None, *, rotation=None, side="input"):
    """F.linear(x, spectral_shift_lq_reference(...), bias) (the test oracle)."""
    return F.linear(x, spectral_shift_lq_reference(L, Qh, delta, rotation=rotation, side=side), bias)


@_autocast
def spectral_linear_lq(
    x: Tensor,
    L: Tensor,
    Qh: Tensor,
    delta: Tensor,
    bias: Tensor | None = None,
    *,
    rotation: Sequence[Tensor] | None = None,
    side: str = "input",
    path: str = "auto",
) -> Tensor:
    """y = x W^T + bias with W = spectral_shift_lq(L, Qh, delta, rotation, side).

    Same path rule as `spectral_linear`; the factored order is y = z L^T + z diag(delta)^T + b with
    z = x B~^T, whose delta gradient is the elementwise colsum(grad_y[:, :k] ⊙ z).
    """
    out, n, k, factors = _check_lq(L, Qh, delta, rotation, side)
    _check_x(x, bias, out, n, "L", L)
    if _pick_path(path, x, L, (delta,), Qh, factors, side, lq=True) == "materialise":
        return F.linear(x, _lq_weight(L, delta, _rotated_basis(Qh, factors, side)), bias)
    x2 = x.reshape(-1, n)
    z = _factored_z(x2, Qh, factors, side)
    shift = F.pad(z * delta, (0, out - k))
    if bias is not None:
        shift = shift + bias
    y = torch.addmm(shift, z, L.mT)
    return y.reshape(*x.shape[:-1], out)
