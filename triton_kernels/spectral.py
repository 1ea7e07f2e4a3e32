"""Triton kernels for the scaled matmul C = A diag(s) B of the spectral shift and its fused backward.

Forward: a tiled GEMM with the spectrum folded into the A tile as it is loaded (no diag(s) matrix,
no scaled copy of A in memory). The same kernel scales output columns instead (SCALE=2), which is
grad_A = (G B^T) diag(s).

Backward, G = dL/dC (r, c). The diagonal extraction is fused into the GEMM epilogue:
  * T kernel: a tile of T = A^T G (directions x columns, reduction over r) is accumulated in
    registers, then reduced against the matching tile of B: partial grad_s[i] = Σ_j T[i,j] B[i,j];
    with STORE=True the same tile, scaled by s, is grad_B.
  * P kernel: a tile of P = G B^T (rows x directions, reduction over c), reduced against A:
    partial grad_s[i] = Σ_r P[r,i] A[r,i]; with STORE=True, P diag(s) is grad_A.
Neither T nor P is written when only grad_s is wanted. Partial sums (one row per tile of the
reduced-away dimension) are summed by the launcher in a fixed order, so results are deterministic.
Accumulation in fp32 (fp64 for fp64 inputs); fp32 dots use IEEE precision (no TF32). bf16/fp16
tiles feed the tensor cores as they are, except under TRITON_INTERPRET=1, whose 16-bit dot is wrong
(Triton 3.9): there UPCAST=True converts the tiles to fp32 first.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from specops._constants import acc_dtype

# (BLOCK_M, BLOCK_N, BLOCK_K) per dtype, sized so that no kernel spills on sm_80/sm_90 with 4 warps
# (IEEE fp32 and fp64 dots run on FMA units and hold their operand tiles in registers).
_BLOCK = {torch.float64: (32, 32, 16), torch.float32: (32, 64, 16)}
_DEFAULT_BLOCK = (32, 64, 32)  # bf16/fp16; (64, 64, 32) spills in the grad_B kernel on sm_80
_NUM_WARPS = 4
_TL_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _dot(x, y, acc_ty, UPCAST: tl.constexpr):
    if UPCAST:
        x = x.to(acc_ty)
        y = y.to(acc_ty)
    return tl.dot(x, y, input_precision="ieee", out_dtype=acc_ty)


@triton.jit
def _tile(ptr, r, c, sr, sc, R, C):
    """The tile ptr[r, c] of an (R, C) matrix with strides (sr, sc), zero outside the matrix."""
    return tl.load(ptr + r[:, None] * sr + c[None, :] * sc, mask=(r[:, None] < R) & (c[None, :] < C), other=0.0)


@triton.jit
def _put(ptr, r, c, sr, sc, R, C, value):
    """Store `value` into the tile ptr[r, c] of an (R, C) matrix with strides (sr, sc), in ptr's dtype."""
    tl.store(ptr + r[:, None] * sr + c[None, :] * sc, value.to(ptr.dtype.element_ty),
             mask=(r[:, None] < R) & (c[None, :] < C))


@triton.jit
def _ranges(B0: tl.constexpr, B1: tl.constexpr):
    """This program's row and column indices in a 2-D grid of (B0, B1) tiles."""
    return tl.program_id(0) * B0 + tl.arange(0, B0), tl.program_id(1) * B1 + tl.arange(0, B1)


@triton.jit
def _scaled_mm_kernel(a_ptr, s_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
                      SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """C (M, N) = A diag(s) B (SCALE=1) or (A B) diag(s) (SCALE=2); s is in the accumulation type."""
    acc_ty = s_ptr.dtype.element_ty
    rm, rn = _ranges(BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = _tile(a_ptr, rm, kk, sam, sak, M, K)
        b = _tile(b_ptr, kk, rn, sbk, sbn, K, N)
        if SCALE == 1:
            sv = tl.load(s_ptr + kk, mask=kk < K, other=0.0)
            a = (a.to(acc_ty) * sv[None, :]).to(b.dtype)
        acc += _dot(a, b, acc_ty, UPCAST)
    if SCALE == 2:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    _put(c_ptr, rm, rn, scm, scn, M, N, acc)


@triton.jit
def _bwd_t_kernel(a_ptr, g_ptr, b_ptr, s_ptr, part_ptr, out_ptr, R, K, C, sar, sak, sgr, sgc, sbk, sbc,
                  STORE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Tile (directions i, columns j) of T = A^T G; part[program_id(1), i] = Σ_j T[i,j] B[i,j];
    STORE: out[i, j] = s[i] T[i, j] (grad_B, contiguous (K, C))."""
    acc_ty = s_ptr.dtype.element_ty
    ri, rj = _ranges(BLOCK_K, BLOCK_C)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        a = _tile(a_ptr, r, ri, sar, sak, R, K)
        acc += _dot(tl.trans(a), _tile(g_ptr, r, rj, sgr, sgc, R, C), acc_ty, UPCAST)
    b = _tile(b_ptr, ri, rj, sbk, sbc, K, C)
    tl.store(part_ptr + tl.program_id(1) * K + ri, tl.sum(acc * b.to(acc_ty), axis=1), mask=ri < K)
    if STORE:
        sv = tl.load(s_ptr + ri, mask=ri < K, other=0.0)
        _put(out_ptr, ri, rj, C, 1, K, C, acc * sv[:, None])


@triton.jit
def _bwd_p_kernel(a_ptr, g_ptr, b_ptr, s_ptr, part_ptr, out_ptr, R, K, C, sar, sak, sgr, sgc, sbk, sbc,
                  STORE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Tile (rows r, directions i) of P = G B^T; part[program_id(0), i] = Σ_r P[r,i] A[r,i];
    STORE: out[r, i] = P[r, i] s[i] (grad_A, contiguous (R, K))."""
    acc_ty = s_ptr.dtype.element_ty
    rr, ri = _ranges(BLOCK_R, BLOCK_K)
    rj = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + rj
        b = _tile(b_ptr, ri, j, sbk, sbc, K, C)
        acc += _dot(_tile(g_ptr, rr, j, sgr, sgc, R, C), tl.trans(b), acc_ty, UPCAST)
    a = _tile(a_ptr, rr, ri, sar, sak, R, K)
    tl.store(part_ptr + tl.program_id(0) * K + ri, tl.sum(acc * a.to(acc_ty), axis=0), mask=ri < K)
    if STORE:
        sv = tl.load(s_ptr + ri, mask=ri < K, other=0.0)
        _put(out_ptr, rr, ri, K, 1, R, K, acc * sv[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _blocks(dtype):
    return _BLOCK.get(dtype, _DEFAULT_BLOCK)


def _upcast(dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _mm(a, s_acc, b, scale):
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    if k == 0:
        return c.zero_()
    bm, bn, bk = _blocks(a.dtype)
    with _on_device(a.device):
        _scaled_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            a, s_acc, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            SCALE=scale, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=_upcast(a.dtype), num_warps=_NUM_WARPS)
    return c


def scaled_matmul_fwd(A: torch.Tensor, s: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A diag(s) B for A (r, k), s (k,), B (k, c) of one dtype (any strides)."""
    return _mm(A, s.to(acc_dtype(A.dtype)).contiguous(), B, scale=1)


def _reduce(G, A, B, s_acc, orient_t, store):
    """One backward kernel: (grad_s partials summed, stored tile product or None)."""
    r, k = A.shape
    c = B.shape[1]
    acc = s_acc.dtype
    bm, bn, bk = _blocks(A.dtype)
    if orient_t:
        grid = (triton.cdiv(k, bm), triton.cdiv(c, bn))
        out = torch.empty((k, c), dtype=A.dtype, device=A.device) if store else A  # unused
        kernel, tiles = _bwd_t_kernel, dict(BLOCK_K=bm, BLOCK_C=bn, BLOCK_R=bk)
    else:
        grid = (triton.cdiv(r, bm), triton.cdiv(k, bn))
        out = torch.empty((r, k), dtype=A.dtype, device=A.device) if store else A  # unused
        kernel, tiles = _bwd_p_kernel, dict(BLOCK_R=bm, BLOCK_K=bn, BLOCK_C=bk)
    part = torch.empty((grid[1] if orient_t else grid[0], k), dtype=acc, device=A.device)
    with _on_device(A.device):
        kernel[grid](A, G, B, s_acc, part, out, r, k, c, A.stride(0), A.stride(1), G.stride(0), G.stride(1),
                     B.stride(0), B.stride(1), STORE=store, **tiles, UPCAST=_upcast(A.dtype), num_warps=_NUM_WARPS)
    return part.sum(0), (out if store else None)


def scaled_matmul_bwd(G, A, s, B, need_A: bool, need_s: bool, need_B: bool):
    """(grad_A, grad_s, grad_B) of C = A diag(s) B (None where not needed); see the module doc."""
    r, k = A.shape
    c = B.shape[1]
    acc = acc_dtype(A.dtype)
    s_acc = s.to(acc).contiguous()
    if r * k * c == 0:
        zeros = (torch.zeros_like(A), torch.zeros_like(s), torch.zeros_like(B))
        return tuple(z if n else None for z, n in zip(zeros, (need_A, need_s, need_B)))
    gA = gs = gB = None
    if need_B:
        gs, gB = _reduce(G, A, B, s_acc, orient_t=True, store=True)
    if need_A:
        gs_p, gA = _reduce(G, A, B, s_acc, orient_t=False, store=True)
        gs = gs if gs is not None else gs_p
    if need_s and gs is None:
        gs, _ = _reduce(G, A, B, s_acc, orient_t=c <= r, store=False)
    return gA, (gs.to(s.dtype) if need_s else None), gB


def aot_specs() -> list[tuple[str, "triton.JITFunction", dict, dict]]:
    """Every (name, kernel, signature, constexprs) the launchers use, for ahead-of-time compiles."""
    specs = []
    opts = {"num_warps": _NUM_WARPS}
    for dtype, ty in _TL_TYPE.items():
        acc = "*" + _TL_TYPE[acc_dtype(dtype)]
        bm, bn, bk = _blocks(dtype)
        mm_sig = {"a_ptr": "*" + ty, "s_ptr": acc, "b_ptr": "*" + ty, "c_ptr": "*" + ty}
        mm_sig.update({n: "i32" for n in ("M", "N", "K", "sam", "sak", "sbk", "sbn", "scm", "scn")})
        for scale in (1, 2):
            specs.append((f"scaled_mm_{ty}_scale{scale}", _scaled_mm_kernel, mm_sig,
                          dict(SCALE=scale, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=False), opts))
        bwd_sig = {"a_ptr": "*" + ty, "g_ptr": "*" + ty, "b_ptr": "*" + ty, "s_ptr": acc, "part_ptr": acc,
                   "out_ptr": "*" + ty}
        bwd_sig.update({n: "i32" for n in ("R", "K", "C", "sar", "sak", "sgr", "sgc", "sbk", "sbc")})
        for store in (False, True):
            specs.append((f"scaled_mm_bwd_t_{ty}_store{int(store)}", _bwd_t_kernel, bwd_sig,
                          dict(STORE=store, BLOCK_K=bm, BLOCK_C=bn, BLOCK_R=bk, UPCAST=False), opts))
            specs.append((f"scaled_mm_bwd_p_{ty}_store{int(store)}", _bwd_p_kernel, bwd_sig,
                          dict(STORE=store, BLOCK_R=bm, BLOCK_K=bn, BLOCK_C=bk, UPCAST=False), opts))
    return specs

