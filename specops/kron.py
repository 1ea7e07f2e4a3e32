"""Kronecker-factored matmul: x @ (A_1 ⊗ ... ⊗ A_k) without forming the product.

With x of shape (..., P), P = ∏ p_i, and factors A_i of shape (p_i, q_i) (torch.kron order),
view each row of x as a tensor of shape (p_1, ..., p_k); then

    y[j_1, ..., j_k] = Σ_{i_1..i_k} x[i_1, ..., i_k] · A_1[i_1, j_1] ··· A_k[i_k, j_k],

i.e. k mode products, y = x ×_1 A_1 ×_2 A_2 ··· ×_k A_k. Applied last mode first, mode i costs
2·M·(∏_{l<i} p_l)·p_i·q_i·(∏_{l>i} q_l) FLOPs: for square factors 2·M·P·Σ p_i in all, instead of
2·M·P² for the dense product.

Gradients: grad_x = grad_y @ (A_1^T ⊗ ... ⊗ A_k^T), itself a Kronecker matmul; grad A_i contracts
(x ×_{l≠i} A_l) with grad_y over every mode but i and over the rows.

Grouped form: factors of shape (G, p_i, q_i) and x of shape (G, ..., P) apply G different
products in one launch (e.g. all same-width layers of a model): y[g] = x[g] @ ⊗_i A_i[g].

block_diag_matmul(x, blocks) is the other structured product of this family, y = x @ blockdiag(B_i):
k different (b, b) blocks on consecutive features (OFT's rotations) where kron_matmul's I_k ⊗ B
would share one.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._constants import FLOAT_DTYPES, acc_dtype
from ._registry import declare, triton_module

__all__ = ["kron_matmul", "kron", "kron_matmul_reference", "kron_reference", "block_diag_matmul",
           "block_diag_matmul_reference"]


def _check_factors(factors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Validate a factor list; returns whether it is grouped (3-D). Raises ValueError."""
    if not isinstance(factors, (list, tuple)) or len(factors) == 0:
        raise ValueError("factors: expected a non-empty list of matrices, got an empty list")
    ndim = factors[0].dim()
    if ndim not in (2, 3):
        raise ValueError(
            f"factors[0]: expected a 2-D (p, q) matrix or a 3-D (G, p, q) group, got shape "
            f"{tuple(factors[0].shape)}"
        )
    grouped = ndim == 3
    for i, f in enumerate(factors):
        if f.dim() != ndim:
            raise ValueError(
                f"factors[{i}]: expected {ndim}-D like factors[0] ("
                f"{'(G, p, q)' if grouped else '(p, q)'}), got shape {tuple(f.shape)}"
            )
        if grouped:
            torch._check_with(ValueError, f.shape[0] == factors[0].shape[0], lambda: (
                f"factors[{i}]: group count G={f.shape[0]} != G={factors[0].shape[0]} of factors[0]"))
        if f.dtype != dtype:
            raise ValueError(f"factors[{i}]: dtype {f.dtype} != {dtype}")
        if f.device != device:
            raise ValueError(f"factors[{i}]: device {f.device} != {device}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"expected a floating dtype {FLOAT_DTYPES}, got {dtype}")
    return grouped


def _check(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Validate kron_matmul inputs; returns whether the call is grouped. Raises ValueError."""
    grouped = _check_factors(factors, x.dtype, x.device)
    P = math.prod(f.shape[-2] for f in factors)
    if x.dim() < (2 if grouped else 1):
        raise ValueError(f"x: expected at least {2 if grouped else 1} dims, got shape {tuple(x.shape)}")
    torch._check_with(ValueError, x.shape[-1] == P, lambda: (
        f"x: last dim must equal the product of the factors' rows "
        f"{' x '.join(str(f.shape[-2]) for f in factors)} = {P}, got x of shape {tuple(x.shape)}"))
    if grouped:
        torch._check_with(ValueError, x.shape[0] == factors[0].shape[0], lambda: (
            f"x: grouped factors have G={factors[0].shape[0]} groups, so x must be (G, ..., {P}); "
            f"got x of shape {tuple(x.shape)}"))
    return grouped


def _out_shape(x: Tensor, factors: Sequence[Tensor]) -> list[int]:
    return [*x.shape[:-1], math.prod(f.shape[-1] for f in factors)]


def _canon(x: Tensor, factors: Sequence[Tensor], grouped: bool):
    """(G, M, P) view of x with a contiguous last dim and (G, p, q) contiguous factors."""
    G = factors[0].shape[0] if grouped else 1
    fs = [f.contiguous() if grouped else f.unsqueeze(0).contiguous() for f in factors]
    # M spelled out: reshape cannot infer a -1 next to a dim of size 0 (empty batches, G = 0).
    x3 = x.reshape(G, math.prod(x.shape[1 if grouped else 0 : -1]), x.shape[-1])
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    return x3, fs


# ----------------------------------------------------------------------------- torch reference


def _mode_product(t: Tensor, A: Tensor, mode: int) -> Tensor:
    """t of shape (G, N, d_1..d_k); multiply mode `mode` (0-based over d) by A (G, p, q)."""
    t = t.movedim(2 + mode, -1)
    A = A.view(A.shape[0], *([1] * (t.dim() - 3)), *A.shape[1:])
    return (t @ A).movedim(-1, 2 + mode)


def _chain(x3: Tensor, fs: Sequence[Tensor], skip: int = -1) -> Tensor:
    """x3 (G, N, P) -> (G, N, d_1..d_k) with every mode but `skip` multiplied by its factor."""
    t = x3.reshape(x3.shape[0], x3.shape[1], *(f.shape[1] for f in fs))
    for i, A in enumerate(fs):
        if i != skip:
            t = _mode_product(t, A, i)
    return t


def kron_matmul_reference(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Pure-torch kron_matmul (the per-factor contraction chain); differentiable by autograd.

    The test oracle, the benchmark baseline and the "torch" backend.
    """
    grouped = _check(x, factors)
    x3, fs = _canon(x, factors, grouped)
    y = _chain(x3, fs)
    return y.reshape(_out_shape(x, factors))


def _fwd_torch(x3, fs):
    return _chain(x3, fs).reshape(x3.shape[0], x3.shape[1], math.prod(f.shape[2] for f in fs))


def _bwd_torch(gy3, x3, fs, need_x, need_factors):
    G, N = x3.shape[:2]
    gx = _fwd_torch(gy3, [f.transpose(1, 2) for f in fs]) if need_x else None
    gfs = None
    if need_factors:
        gt = gy3.reshape(G, N, *(f.shape[2] for f in fs))
        gfs = []
        for i, f in enumerate(fs):
            u = _chain(x3, fs, skip=i).movedim(2 + i, -1).flatten(1, -2)
            g = gt.movedim(2 + i, -1).flatten(1, -2)
            gfs.append(u.transpose(1, 2) @ g)
    return gx, gfs


# ----------------------------------------------------------------------------- other backends


def _fwd_ext(x3, fs):
    return torch.ops.specops_ext.kron_matmul_fwd(x3, fs)


def _bwd_ext(gy3, x3, fs, need_x, need_factors):
    gx, gfs = torch.ops.specops_ext.kron_matmul_bwd(gy3, x3, fs, need_x, need_factors)
    return (gx if need_x else None), (list(gfs) if need_factors else None)


def _fwd_triton(x3, fs):
    return triton_module("kron").kron_matmul_fwd(x3.contiguous(), fs)


def _bwd_triton(gy3, x3, fs, need_x, need_factors):
    return triton_module("kron").kron_matmul_bwd(gy3.contiguous(), x3.contiguous(), fs, need_x, need_factors)


# ----------------------------------------------------------------------------- the ops


def _forward(kernel):
    """The op's kernel for a backend kernel on (G, M, P) rows and (G, p, q) factors."""

    def run(x, factors):
        x3, fs = _canon(x, factors, factors[0].dim() == 3)
        return kernel(x3, fs).reshape(_out_shape(x, factors))

    return run


def _backward_kernel(kernel):
    """The backward op's kernel: [grad_x (empty unless need_x), *grad_factors (only when need_factors)]."""

    def run(grad_y, x, factors, need_x, need_factors):
        x3, fs = _canon(x, factors, factors[0].dim() == 3)
        gy3 = grad_y.reshape(x3.shape[0], x3.shape[1], math.prod(f.shape[-1] for f in factors))
        if gy3.stride(-1) != 1:
            gy3 = gy3.contiguous()
        gx, gfs = kernel(gy3, x3, fs, need_x, need_factors)
        out = [gx.reshape(x.shape) if need_x else x.new_empty(0)]
        if need_factors:
            out += [g.reshape(f.shape).to(f.dtype) for g, f in zip(gfs, factors)]
        return out

    return run


def _backward_fake(grad_y, x, factors, need_x, need_factors):
    out = [x.new_empty(x.shape) if need_x else x.new_empty(0)]
    if need_factors:
        out += [f.new_empty(f.shape) for f in factors]
    return out


_kron_matmul_backward = declare(
    "kron_matmul_backward",
    "(Tensor grad_y, Tensor x, Tensor[] factors, bool need_x, bool need_factors) -> Tensor[]",
    kernels={"torch": _backward_kernel(_bwd_torch), "cpp": _backward_kernel(_bwd_ext),
             "cuda": _backward_kernel(_bwd_ext), "triton": _backward_kernel(_bwd_triton)},
    check=lambda grad_y, x, factors, need_x, need_factors: _check(x, factors),
    fake=_backward_fake,
)


def _setup_context(ctx, inputs, output):
    x, factors = inputs
    ctx.need_x = x.requires_grad
    ctx.need_factors = any(f.requires_grad for f in factors)
    ctx.save_for_backward(x, *factors)


def _backward(ctx, grad_y):
    x, *factors = ctx.saved_tensors
    if not (ctx.need_x or ctx.need_factors):
        return None, [None] * len(factors)
    out = _kron_matmul_backward(grad_y, x, factors, ctx.need_x, ctx.need_factors)
    grad_x = out[0] if ctx.need_x else None
    grad_factors = list(out[1:]) if ctx.need_factors else [None] * len(factors)
    return grad_x, grad_factors


def _samples(device, dtype):
    """Plain and grouped calls with 1-3 factors, square and not, q = 1 included."""
    out = []
    for shapes in ([(3, 5)], [(7, 2), (5, 1)], [(2, 2), (3, 5), (4, 4)]):
        for lead in ((), (3,)):
            x = torch.randn(*lead, 5, math.prod(p for p, _ in shapes), device=device, dtype=dtype)
            out.append((x, [torch.randn(*lead, p, q, device=device, dtype=dtype) for p, q in shapes]))
    return out


def _vmap(info, in_dims, x, factors):
    """vmap of kron_matmul as one call: over x alone the batch joins x's free leading dims (after G
    when grouped); over factors it is the grouped form (B groups, or B·G for grouped factors), x and
    unbatched factors broadcast to the batch."""
    xd, fds = in_dims
    fds = list(fds) if isinstance(fds, (list, tuple)) else [fds] * len(factors)
    B = info.batch_size
    grouped = factors[0].dim() - (fds[0] is not None) == 3
    if all(d is None for d in fds):
        if not grouped:
            return kron_matmul(x.movedim(xd, 0), factors), 0
        return kron_matmul(x.movedim(xd, 1), factors), 1  # x (G, B, ..., P): group g still first
    fs = [f.movedim(d, 0) if d is not None else f.expand(B, *f.shape) for f, d in zip(factors, fds)]
    xb = x.movedim(xd, 0) if xd is not None else x.expand(B, *x.shape)
    if not grouped:
        return kron_matmul(xb, fs), 0
    G = fs[0].shape[1]
    y = kron_matmul(xb.reshape(B * G, *xb.shape[2:]), [f.reshape(B * G, *f.shape[2:]) for f in fs])
    return y.reshape(B, G, *y.shape[1:]), 0


kron_matmul = declare(
    "kron_matmul",
    "(Tensor x, Tensor[] factors) -> Tensor",
    kernels={"torch": _forward(_fwd_torch), "cpp": _forward(_fwd_ext), "cuda": _forward(_fwd_ext),
             "triton": _forward(_fwd_triton)},
    check=_check,
    fake=lambda x, factors: x.new_empty(_out_shape(x, factors)),
    reference=lambda x, factors: kron_matmul_reference(x, factors),
    backward="kron_matmul_backward",
    setup_context=_setup_context,
    backward_fn=_backward,
    samples=_samples,
    vmap=_vmap,
    doc="""y = x @ (A_1 ⊗ A_2 ⊗ ... ⊗ A_k), never forming the (P, Q) product.

    Args:
        x: (..., P) with P = ∏ p_i; grouped: (G, ..., P).
        factors: k >= 1 matrices A_i of shape (p_i, q_i), square or not (torch.kron order);
            or, grouped, k tensors of shape (G, p_i, q_i): group g of x uses ⊗_i A_i[g].
    Returns:
        (..., Q) with Q = ∏ q_i, in x's dtype (bf16/fp16 accumulate in fp32).

    Differentiable in x and every factor, to any order (see `specops._registry`: second derivatives
    go through torch ops). Raises ValueError on an empty factor list, factors that are not 2-D (3-D
    grouped), ∏ p_i != x.shape[-1], a G mismatch, or mixed dtypes/devices. Backend: see
    `specops.backend`.
    """,
)


def kron_reference(factors: Sequence[Tensor]) -> Tensor:
    """A_1 ⊗ ... ⊗ A_k with torch.kron folded over the factors (vmapped over groups, G = 0 too)."""
    # torch.kron fails on some transposed inputs ("view size is not compatible"): copy them first.
    fs = [f.contiguous() for f in factors]

    def fold(*fs):
        return functools.reduce(torch.kron, fs)

    return torch.func.vmap(fold)(*fs) if fs[0].dim() == 3 else fold(*fs)


def _kron_impl(factors: list[Tensor]) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        # (..., a, b) ⊗ (..., c, d) -> (..., a·c, b·d), batched over the leading group dim.
        a, b = out.shape[-2:]
        c, d = f.shape[-2:]
        out = (out[..., :, None, :, None] * f[..., None, :, None, :]).reshape(
            *out.shape[:-2], a * c, b * d
        )
    return out


def _check_kron(factors):
    if not isinstance(factors, (list, tuple)) or len(factors) == 0:
        raise ValueError("factors: expected a non-empty list of matrices, got an empty list")
    _check_factors(factors, factors[0].dtype, factors[0].device)


def _kron_samples(device, dtype):
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return [([mk(2, 3)],), ([mk(2, 3), mk(3, 1), mk(2, 2)],), ([mk(4, 2, 3), mk(4, 2, 2)],)]


kron = declare(
    "kron",
    "(Tensor[] factors) -> Tensor",
    composite=_kron_impl,
    check=_check_kron,
    reference=lambda factors: kron_reference(factors),
    samples=_kron_samples,
    doc="""The materialised product A_1 ⊗ ... ⊗ A_k (for export and merging); grouped (G, p, q) too.

    Shape (∏ p_i, ∏ q_i), or (G, ∏ p_i, ∏ q_i) for grouped factors. Differentiable. Equal to
    torch.kron folded over the factors, and kron_matmul(x, factors) == x @ kron(factors).
    """,
)


# ----------------------------------------------------------------------------- block_diag_matmul op


def _check_block_diag(x: Tensor, blocks: Tensor, perm: Tensor | None = None) -> None:
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks: expected (k, b, b) square blocks, got shape {tuple(blocks.shape)}")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim (..., k b), got a scalar")
    k, b = blocks.shape[:2]
    torch._check_with(ValueError, x.shape[-1] == k * b, lambda: (
        f"x: last dim must be k b = {k} x {b} = {k * b} for blocks of shape {tuple(blocks.shape)}, "
        f"got x of shape {tuple(x.shape)}"))
    if blocks.dtype != x.dtype or blocks.device != x.device:
        raise ValueError(f"blocks: dtype/device {blocks.dtype}/{blocks.device} != x's {x.dtype}/{x.device}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype {FLOAT_DTYPES}, got {x.dtype}")
    if perm is not None:
        if perm.dim() != 1 or perm.dtype != torch.int64 or perm.device != x.device:
            raise ValueError(f"perm: expected a 1-D int64 permutation on {x.device}, got {tuple(perm.shape)} "
                             f"{perm.dtype} on {perm.device}")
        torch._check_with(ValueError, perm.shape[0] == x.shape[-1], lambda: (
            f"perm: expected length {x.shape[-1]} (x's last dim), got {perm.shape[0]}"))


def block_diag_matmul_reference(x: Tensor, blocks: Tensor, perm: Tensor | None = None) -> Tensor:
    """x Pᵀ blockdiag(blocks) P in plain torch, the dense (k b, k b) matrix (differentiable)."""
    _check_block_diag(x, blocks, perm)
    M = torch.block_diag(*blocks.unbind(0)) if blocks.shape[0] else x.new_zeros(0, 0)
    if perm is not None:
        P = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)[perm]  # (x Pᵀ)[j] = x[perm[j]]
        M = P.mT @ M @ P
    return x @ M


def _bdm_torch(x: Tensor, blocks: Tensor, perm: Tensor | None = None) -> Tensor:
    xp = x if perm is None else x.index_select(-1, perm)
    y = torch.einsum("...ki,kij->...kj", xp.unflatten(-1, blocks.shape[:2]), blocks).flatten(-2)
    return y if perm is None else y.index_select(-1, torch.argsort(perm))


def _bdm_bwd_torch(g, x, blocks, perm, need_x, need_blocks):
    gx = _bdm_torch(g, blocks.mT, perm) if need_x else None
    gB = None
    if need_blocks:
        acc = acc_dtype(x.dtype)
        if perm is not None:
            x, g = x.index_select(-1, perm), g.index_select(-1, perm)
        xb, gb = x.unflatten(-1, blocks.shape[:2]).to(acc), g.unflatten(-1, blocks.shape[:2]).to(acc)
        gB = torch.einsum("...ki,...kj->kij", xb, gb)
    return gx, gB


def _bdm_ext(x, blocks, perm=None):
    return torch.ops.specops_ext.block_diag_matmul_fwd(x, blocks, perm)


def _bdm_bwd_ext(g, x, blocks, perm, need_x, need_blocks):
    gx, gB = torch.ops.specops_ext.block_diag_matmul_bwd(g, x, blocks, perm, need_x, need_blocks)
    return (gx if need_x else None), (gB if need_blocks else None)


def _bdm_backward_kernel(kernel):
    """The backward op's kernel: [grad_x, grad_blocks], one not asked for an empty tensor."""

    def run(grad, x, blocks, perm, need_x, need_blocks):
        gx, gB = kernel(grad, x, blocks, perm, need_x, need_blocks)
        return [x.new_empty(0) if gx is None else gx, x.new_empty(0) if gB is None else gB.to(blocks.dtype)]

    return run


_block_diag_matmul_backward = declare(
    "block_diag_matmul_backward",
    "(Tensor grad, Tensor x, Tensor blocks, Tensor? perm, bool need_x, bool need_blocks) -> Tensor[]",
    kernels={"torch": _bdm_backward_kernel(_bdm_bwd_torch), "cpp": _bdm_backward_kernel(_bdm_bwd_ext)},
    check=lambda grad, x, blocks, perm, need_x, need_blocks: _check_block_diag(x, blocks, perm),
    fake=lambda grad, x, blocks, perm, need_x, need_blocks: [x.new_empty(x.shape if need_x else 0),
                                                             blocks.new_empty(blocks.shape if need_blocks else 0)],
)


def _bdm_setup_context(ctx, inputs, output):
    x, blocks, perm = inputs
    ctx.needs = (x.requires_grad, blocks.requires_grad)
    ctx.save_for_backward(x, blocks, perm)


def _bdm_backward(ctx, grad):
    x, blocks, perm = ctx.saved_tensors
    if not any(ctx.needs):
        return None, None, None
    gx, gB = _block_diag_matmul_backward(grad, x, blocks, perm, *ctx.needs)
    return (gx if ctx.needs[0] else None), (gB if ctx.needs[1] else None), None


def _bdm_samples(device, dtype):
    """Block sizes around the kernels' vectors (1, 3, 8, 10, 17: partial, whole and paired vectors),
    rows around the register and row tiles, batch dims, no rows, strided x and blocks, and permutations."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    perm = lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(n)).to(device)  # noqa: E731
    out = [(mk(T, k * b), mk(k, b, b)) for T, k, b in ((7, 3, 1), (5, 2, 3), (37, 4, 8), (6, 3, 10), (3, 2, 17))]
    return out + [(mk(2, 3, 16), mk(2, 8, 8)), (mk(0, 6), mk(2, 3, 3)),
                  (mk(9, 12).mT, mk(3, 3, 3).mT), (mk(5, 24)[:, ::2], mk(4, 3, 3)),
                  (mk(33, 20), mk(2, 10, 10), perm(20)), (mk(2, 3, 12), mk(4, 3, 3), perm(12))]


block_diag_matmul = declare(
    "block_diag_matmul",
    "(Tensor x, Tensor blocks, Tensor? perm=None) -> Tensor",
    kernels={"torch": _bdm_torch, "cpp": _bdm_ext},
    check=_check_block_diag,
    fake=lambda x, blocks, perm=None: x.new_empty(x.shape),
    reference=block_diag_matmul_reference,
    backward="block_diag_matmul_backward",
    setup_context=_bdm_setup_context,
    backward_fn=_bdm_backward,
    samples=_bdm_samples,
    doc="""y = x @ blockdiag(B_0, ..., B_{k-1}) for x (..., k b) and blocks (k, b, b): y_i = x_i B_i on the
    i-th b features (OFT's block rotations, on a layer's input or output features). With perm, an int64
    permutation of the n = k b features, y = x Pᵀ blockdiag(B) P, (x Pᵀ)[j] = x[perm[j]]: block i acts on
    the features perm[i b : (i + 1) b] and writes its result there (one butterfly stage of BOFT).

    Differentiable in x and blocks, to any order. With G = dL/dy (gathered by perm): grad_x_i = G_i B_iᵀ
    and grad_B_i = Σ_rows x_iᵀ G_i. 2·rows·k·b² FLOPs forward and twice that backward, against one
    read and one write of x: memory-bound for the small blocks OFT uses. The cpp kernel (every float
    dtype; bf16 and fp16 accumulate in fp32) makes one pass over tiles of rows forward and one backward
    (grad_x and grad_B from the same tile; a permutation gathers and scatters each tile in cache), with
    register tiles over each block's rows; the torch kernel is einsum (and index_select), whose batched
    GEMMs with inner size b run far below that on the CPU.
    """,
)
