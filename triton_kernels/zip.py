"""Triton kernels for ZipLoRA: y += s_c·B_c A_c (m_c ⊙ x) + s_s·B_s A_s (m_s ⊙ x) and its merger gradient.

Two LoRAs of ranks r1, r2 are handled as one of rank R = r1 + r2 (padded to R_PAD, a power of two)
whose rows are gathered from the two pieces by masked loads, the column scaling s·m[j] applied as
the tile is loaded. Nothing of size (out, in) or (T, in) beyond the inputs and outputs is formed.

_lowrank_kernel (forward, and grad_x in the backward), one program per BLOCK_T tokens:

    h[t, k]    = Σ_j X[t, j] L[k, j]          (BLOCK_T x R_PAD, registers; stored to H on request)
    out[t, n] (+)= Σ_k h[t, k] M[k, n]         (both low-rank products in one pass over X)

  forward: X = x, L = A' = [s_c A_c diag(m_c); s_s A_s diag(m_s)], M = [B_c | B_s]^T, out = y
  (holding the base GEMM's x W^T + b, computed by torch/cuBLAS). grad_x: X = g, L = [B_c | B_s]^T,
  M = A', out = grad_x (holding g W), H = u = g [B_c | B_s].

_merger_grad_kernel, one program per (BLOCK_J columns, token split): the token reduction
G[k, j] = Σ_t u[t, k] x[t, j] stays in registers and is contracted on the spot,

    grad_m_c[j] = s_c Σ_{k<r1} A_c[k, j] G[k, j],   grad_A_c[k, j] = s_c m_c[j] G[k, j]   (same for s),

  each token split writing its partial sums (summed by the launcher; one split when T is small).

Accumulation is fp32 (fp64 for fp64); tiles are converted to the accumulation type on load, bf16/fp16
inputs then use TF32 dots (exact for their values), fp32/fp64 IEEE dots (torch's default: no TF32).
Total ranks r1 + r2 beyond _MAX_R_PAD (the widest configuration that compiles without register
spills on sm_80 and sm_90: fp32 64, fp64 and bf16/fp16 128) are refused (`supports`): the op then
runs another backend.
"""

import torch
import triton
import triton.language as tl

from specops._constants import acc_dtype

_AOT_R_PAD = (16, 32, 64, 128)
_MAX_R_PAD = {torch.float32: 64, torch.float64: 128, torch.bfloat16: 128, torch.float16: 128}
_NUM_WARPS = 4

_TL_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _precision(dtype):
    """Dots run on acc-dtype (fp32/fp64) tiles. bf16/fp16 values are exact in TF32, so TF32 tensor
    cores lose nothing on the inputs; fp32 inputs get IEEE dots (torch's default: no TF32)."""
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def _r_pad(r):
    return max(16, triton.next_power_of_2(r))


def supports(r: int, dtype: torch.dtype) -> str | None:
    """None when a total rank r = r1 + r2 of `dtype` inputs fits these kernels, else why not."""
    if _r_pad(r) > _MAX_R_PAD[dtype]:
        return f"r_c + r_s = {r} pads to {_r_pad(r)} > {_MAX_R_PAD[dtype]}, the widest {dtype} configuration"
    return None


# Tile sizes per (rank padding, element size of the accumulation type): h (BLOCK_T x R_PAD) and G
# (R_PAD x BLOCK_J) live in registers for a whole program, so wide ranks get fewer tokens/columns.
# Chosen so that every configuration compiles without spills for sm_80 and sm_90 (4 warps).
def _lowrank_cfg(r_pad, dtype):
    """Constexprs BLOCK_T, BLOCK_K, BLOCK_N of _lowrank_kernel."""
    wide = acc_dtype(dtype) == torch.float64
    bt = 32 if r_pad <= 32 and not wide else 16
    return {"BLOCK_T": bt, "BLOCK_K": 16, "BLOCK_N": 32 if r_pad <= 64 else 16}


def _merger_cfg(r_pad, dtype):
    """Constexprs BLOCK_T, BLOCK_J of _merger_grad_kernel."""
    wide = acc_dtype(dtype) == torch.float64
    bj = 32 if r_pad <= 64 and not wide else 16
    return {"BLOCK_T": 16, "BLOCK_J": bj}


@triton.jit
def _load_two(p1, p2, s1r, s1c, s2r, s2c, r1, r2, rows, cols, n_cols):
    """Tile T[rows, cols] of the row-stacked [P1; P2] (P1: r1 rows, strides s1r, s1c; P2: r2 rows,
    strides s2r, s2c), zero outside."""
    col_ok = (cols < n_cols)[None, :]
    in1 = (rows < r1)[:, None] & col_ok
    in2 = ((rows >= r1) & (rows < r1 + r2))[:, None] & col_ok
    t1 = tl.load(p1 + rows[:, None] * s1r + cols[None, :] * s1c, mask=in1, other=0.0)
    t2 = tl.load(p2 + (rows - r1)[:, None] * s2r + cols[None, :] * s2c, mask=in2, other=0.0)
    return t1 + t2


@triton.jit
def _lowrank_kernel(X, L1, L2, M1, M2, V1, V2, OUT, H, T, K, N, r1, r2, s1: tl.float64, s2: tl.float64,
                    l1r, l1c, l2r, l2c, m1r, m1c, m2r, m2c, scale_l, scale_m, accum, store_h,
                    PRECISION: tl.constexpr, R_PAD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[t] (+)= (X[t] L^T) M for BLOCK_T rows t of X (T, K), OUT (T, N) row-major.

    L (R, K): rows k < r1 from L1 (strides l1r, l1c), then L2; times s·V[col] if scale_l.
    M (R, N): rows k < r1 from M1 (strides m1r, m1c), then M2; times s·V[col] if scale_m.
    accum: add OUT's current values; store_h: write h = X L^T to H (T, r1 + r2), acc dtype.
    """
    acc_ty = V1.dtype.element_ty
    s1, s2 = tl.cast(s1, acc_ty), tl.cast(s2, acc_ty)  # (fp64 arguments: Triton would round a plain float to fp32)
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    k = tl.arange(0, R_PAD)
    first = (k < r1)[:, None]
    h = tl.zeros([BLOCK_T, R_PAD], dtype=acc_ty)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < K
        xt = tl.load(X + t64[:, None] * K + j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        lt = _load_two(L1, L2, l1r, l1c, l2r, l2c, r1, r2, k, j, K).to(acc_ty)
        if scale_l != 0:
            v1 = tl.load(V1 + j, mask=j_ok, other=0.0) * s1
            v2 = tl.load(V2 + j, mask=j_ok, other=0.0) * s2
            lt = lt * tl.where(first, v1[None, :], v2[None, :])
        h += tl.dot(xt.to(acc_ty), tl.trans(lt), input_precision=PRECISION)
    if store_h != 0:
        tl.store(H + t64[:, None] * (r1 + r2) + k[None, :], h, mask=t_ok[:, None] & (k < r1 + r2)[None, :])
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        mt = _load_two(M1, M2, m1r, m1c, m2r, m2c, r1, r2, k, n, N).to(acc_ty)
        if scale_m != 0:
            v1 = tl.load(V1 + n, mask=n_ok, other=0.0) * s1
            v2 = tl.load(V2 + n, mask=n_ok, other=0.0) * s2
            mt = mt * tl.where(first, v1[None, :], v2[None, :])
        o = tl.dot(h, mt, input_precision=PRECISION)
        ptrs = OUT + t64[:, None] * N + n[None, :]
        mask = t_ok[:, None] & n_ok[None, :]
        if accum != 0:
            o += tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
        tl.store(ptrs, o.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _merger_grad_kernel(U, X, A1, A2, V1, V2, GM, GA, T, K, r1, r2, s1: tl.float64, s2: tl.float64, tokens_per_split,
                        need_m, need_a, PRECISION: tl.constexpr, R_PAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
    """Partial merger gradients of one token split over BLOCK_J columns (see the module docstring).

    U (T, r1 + r2) acc dtype, X (T, K), A1 (r1, K), A2 (r2, K) row-major; V1, V2 the mergers (acc
    dtype). GM (splits, 2, K) and GA (splits, r1 + r2, K) receive acc-dtype partial sums.
    """
    acc_ty = V1.dtype.element_ty
    s1, s2 = tl.cast(s1, acc_ty), tl.cast(s2, acc_ty)
    pid_j = tl.program_id(0)
    split = tl.program_id(1)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < K
    k = tl.arange(0, R_PAD)
    R = r1 + r2
    G = tl.zeros([R_PAD, BLOCK_J], dtype=acc_ty)
    t_begin = split * tokens_per_split
    t_end = tl.minimum(T, t_begin + tokens_per_split)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        t64 = t.to(tl.int64)
        ut = tl.load(U + t64[:, None] * R + k[None, :], mask=t_ok[:, None] & (k < R)[None, :], other=0.0)
        xt = tl.load(X + t64[:, None] * K + j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        G += tl.dot(tl.trans(ut), xt.to(acc_ty), input_precision=PRECISION)
    first = (k < r1)[:, None]
    s = tl.where(first, s1, s2)
    if need_m != 0:
        a = _load_two(A1, A2, K, 1, K, 1, r1, r2, k, j, K).to(acc_ty)
        ga = G * a * s
        base = GM + split.to(tl.int64) * 2 * K
        tl.store(base + j, tl.sum(tl.where(first, ga, 0.0), axis=0), mask=j_ok)
        tl.store(base + K + j, tl.sum(tl.where(first, 0.0, ga), axis=0), mask=j_ok)
    if need_a != 0:
        v1 = tl.load(V1 + j, mask=j_ok, other=0.0)
        v2 = tl.load(V2 + j, mask=j_ok, other=0.0)
        gA = G * s * tl.where(first, v1[None, :], v2[None, :])
        tl.store(GA + split.to(tl.int64) * R * K + k[:, None] * K + j[None, :], gA,
                 mask=(k < R)[:, None] & j_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def _lowrank(X, L, M, v, s, out, H, scale_l, scale_m, accum):
    """Launch _lowrank_kernel; L, M: ((piece1, r_stride, c_stride), (piece2, ...)), v: (V1, V2)."""
    (L1, l1r, l1c, r1), (L2, l2r, l2c, r2) = L
    (M1, m1r, m1c), (M2, m2r, m2c) = M
    T, K = X.shape
    N = out.shape[1] if out is not None else 0
    r_pad = _r_pad(r1 + r2)
    cfg = _lowrank_cfg(r_pad, X.dtype)
    dummy = H if H is not None else out
    _lowrank_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        X, L1, L2, M1, M2, v[0], v[1], out if out is not None else H, dummy, T, K, N, r1, r2, float(s[0]), float(s[1]),
        l1r, l1c, l2r, l2c, m1r, m1c, m2r, m2c, int(scale_l), int(scale_m), int(accum), int(H is not None),
        PRECISION=_precision(X.dtype), R_PAD=r_pad, **cfg, num_warps=_NUM_WARPS,
    )


def _a_pieces(A_c, A_s):
    K = A_c.shape[1]
    return (A_c, K, 1, A_c.shape[0]), (A_s, K, 1, A_s.shape[0])


def zip_lora_linear_fwd(x2, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s):
    """(T, out) = x2 W^T + b + x2 A'^T B'^T: the base GEMM by torch, the adapter branch by one kernel."""
    r1, r2 = A_c.shape[0], A_s.shape[0]
    T, K = x2.shape
    N = B_c.shape[0]
    x2 = x2.contiguous()
    if weight is not None:
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    elif bias is not None:
        # repeat, not expand().contiguous(): for T <= 1 that is a view of bias, which the kernel
        # would then accumulate into (and an op output may not alias an input).
        y = bias.repeat(T, 1)
    else:
        y = x2.new_empty(T, N)
    if T == 0 or N == 0:
        return y
    acc = acc_dtype(x2.dtype)
    A_c, A_s, B_c, B_s = (t.contiguous() for t in (A_c, A_s, B_c, B_s))
    v = (m_c.to(acc).contiguous(), m_s.to(acc).contiguous())
    # M = [B_c | B_s]^T: row k of M is column k of B.
    M = ((B_c, 1, r1), (B_s, 1, r2))
    _lowrank(x2, _a_pieces(A_c, A_s), M, v, (scale_c, scale_s), y, None, True, False,
             weight is not None or bias is not None)
    return y


def _splits(T, n_jblocks, bt):
    """Token splits of the merger reduction: enough programs to fill a GPU, >= 4 blocks of tokens each."""
    splits = max(1, min(triton.cdiv(T, 4 * bt), triton.cdiv(256, n_jblocks)))
    per = triton.cdiv(triton.cdiv(T, splits), bt) * bt
    return triton.cdiv(T, per), per


def zip_lora_linear_bwd(g2, x2, weight, B_c, A_c, m_c, B_s, A_s, m_s, scale_c, scale_s, need):
    """{name: gradient, or None where not needed} for need = {name: bool} over zip_lora_linear's
    tensor arguments (x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s).

    grad_x and u = g [B_c | B_s] come from one _lowrank_kernel pass; the merger and A gradients from
    _merger_grad_kernel; the rarely trained B, W, b gradients from torch GEMMs.
    """
    out = dict.fromkeys(need)
    r1, r2 = A_c.shape[0], A_s.shape[0]
    T, K = x2.shape
    acc = acc_dtype(x2.dtype)
    g2, x2 = g2.contiguous(), x2.contiguous()
    A_c, A_s, B_c, B_s = (t.contiguous() for t in (A_c, A_s, B_c, B_s))
    v = (m_c.to(acc).contiguous(), m_s.to(acc).contiguous())
    s = (scale_c, scale_s)
    need_a = need["A_c"] or need["A_s"]
    need_m = need["m_c"] or need["m_s"]
    if need["x"] or need_a or need_m:
        u = g2.new_empty(T, r1 + r2, dtype=acc)
        gx = None
        if need["x"]:
            gx = g2 @ weight if weight is not None else g2.new_empty(T, K)
        # L = [B_c | B_s]^T (row k = column k of B), M = A' (scaled columns of A).
        L = ((B_c, 1, r1, r1), (B_s, 1, r2, r2))
        _lowrank(g2, L, ((A_c, K, 1), (A_s, K, 1)), v, s, gx, u, False, True, weight is not None)
        out["x"] = gx
        if (need_a or need_m) and T > 0:
            r_pad = _r_pad(r1 + r2)
            cfg = _merger_cfg(r_pad, x2.dtype)
            n_j = triton.cdiv(K, cfg["BLOCK_J"])
            splits, per = _splits(T, n_j, cfg["BLOCK_T"])
            gm = torch.empty(splits, 2, K, dtype=acc, device=x2.device)
            ga = torch.empty(splits, r1 + r2, K, dtype=acc, device=x2.device) if need_a else gm
            _merger_grad_kernel[(n_j, splits)](
                u, x2, A_c, A_s, v[0], v[1], gm, ga, T, K, r1, r2, float(scale_c), float(scale_s), per,
                int(need_m), int(need_a), PRECISION=_precision(x2.dtype), R_PAD=r_pad,
                **cfg, num_warps=_NUM_WARPS,
            )
            gm, ga = gm.sum(0), ga.sum(0)
            # copies: the op's outputs may not alias each other
            out["m_c"], out["m_s"] = gm[0].to(x2.dtype, copy=True), gm[1].to(x2.dtype, copy=True)
            out["A_c"], out["A_s"] = ga[:r1].to(x2.dtype, copy=True), ga[r1:].to(x2.dtype, copy=True)
        elif need_a or need_m:
            out["m_c"], out["m_s"] = x2.new_zeros(K), x2.new_zeros(K)
            out["A_c"], out["A_s"] = x2.new_zeros(r1, K), x2.new_zeros(r2, K)
    if need["B_c"] or need["B_s"]:
        h = x2.new_zeros(T, r1 + r2, dtype=acc)
        if T > 0:
            _lowrank(x2, _a_pieces(A_c, A_s), ((B_c, 1, r1), (B_s, 1, r2)), v, s, None, h, True, False, False)
        gB = g2.t() @ h.to(x2.dtype)
        out["B_c"], out["B_s"] = gB[:, :r1], gB[:, r1:]
    if need["weight"]:
        out["weight"] = g2.t() @ x2
    if need["bias"]:
        out["bias"] = g2.sum(0, dtype=acc).to(g2.dtype)
    return out


def aot_specs() -> list[tuple[str, "triton.JITFunction", dict, dict]]:
    """Every (name, kernel, signature, constexprs) the launchers can use, for ahead-of-time compiles."""
    specs = []
    for dtype, ty in _TL_TYPE.items():
        acc = "*" + _TL_TYPE[acc_dtype(dtype)]
        for r_pad in (r for r in _AOT_R_PAD if r <= _MAX_R_PAD[dtype]):
            sig = {"X": "*" + ty, "L1": "*" + ty, "L2": "*" + ty, "M1": "*" + ty, "M2": "*" + ty, "V1": acc,
                   "V2": acc}
            # OUT is the output (x's dtype) or, for the h-only launches, H itself (acc dtype): both.
            for out_ty in dict.fromkeys(("*" + ty, acc)):
                lsig = dict(sig, OUT=out_ty, H=acc)
                lsig.update({n: "i32" for n in ("T", "K", "N", "r1", "r2")})
                lsig.update({"s1": "fp64", "s2": "fp64"})
                lsig.update({n: "i32" for n in ("l1r", "l1c", "l2r", "l2c", "m1r", "m1c", "m2r", "m2c", "scale_l",
                                                 "scale_m", "accum", "store_h")})
                cx = {"PRECISION": _precision(dtype), "R_PAD": r_pad, **_lowrank_cfg(r_pad, dtype)}
                name = f"zip_lowrank_{ty}_r{r_pad}" + ("" if out_ty == "*" + ty else "_hout")
                specs.append((name, _lowrank_kernel, lsig, cx))
            msig = {"U": acc, "X": "*" + ty, "A1": "*" + ty, "A2": "*" + ty, "V1": acc, "V2": acc, "GM": acc,
                    "GA": acc, "T": "i32", "K": "i32", "r1": "i32", "r2": "i32", "s1": "fp64", "s2": "fp64",
                    "tokens_per_split": "i32", "need_m": "i32", "need_a": "i32"}
            cx = {"PRECISION": _precision(dtype), "R_PAD": r_pad, **_merger_cfg(r_pad, dtype)}
            specs.append((f"zip_merger_grad_{ty}_r{r_pad}", _merger_grad_kernel, msig, cx))
    return specs
