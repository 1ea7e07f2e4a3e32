"""Triton kernels for the Kronecker-factored matmul y = x @ (A_1 ⊗ ... ⊗ A_k).

A row of x of length P = ∏ p_i is a tensor of shape (p_1, ..., p_k) (row-major, p_1 slowest) and

    y[j_1..j_k] = Σ_{i_1..i_k} x[i_1..i_k] ∏_l A_l[i_l, j_l],

i.e. k mode products (mode l multiplied by A_l) that commute. With the current row tensor viewed as
(a, n_in, c) around the mode being processed, one mode product is

    out[a, j, c] = Σ_t in[a, t, c] · A[t, j].

Every kernel takes a block of BLOCK_M rows through all k mode products in one launch, ping-ponging
between two per-program scratch regions of a global workspace (small enough to stay in L2 on a GPU).
Factor count and sizes are runtime values described by an int32 meta table, so one compiled kernel
serves every factorisation. No kernel ever forms the P x Q Kronecker product.

Each mode product runs on FMA units over gathered operands (any factor shape, no padding), or, for
bf16/fp16 inputs and factors with both dims >= 16, as tl.dot GEMM tiles on tf32 tensor cores.
Intermediates are fp32 (fp64 for fp64 inputs); fp32/fp64 inputs never go through tf32.
"""

import torch
import triton
import triton.language as tl

from specops._constants import acc_dtype

# Meta tables hold 8 int32 per entry; the fields are documented at the kernels.

# Warps per program; the ahead-of-time compile (aot_specs) uses Triton's default, also 4.
_NUM_WARPS = 4
# Elements of one [BLOCK_M, BLOCK_N] register tile (BLOCK_N = tile / BLOCK_M): the forward kernel
# holds one accumulator and one gathered operand per element, the factor-gradient kernel two
# operands, hence its smaller tile (no kernel needs more than 128 registers per thread).
_FWD_TILE = 1024
_GRAD_TILE = 512
# Rows per program; the launcher picks one (see _block_m).
_AOT_BLOCK_M = (16, 32)

_TL_TYPE = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


# tl.dot tiles (16-bit inputs, factors with both dims >= _DOT_K). Mode product: [_DOT_R positions,
# _DOT_K contracted] x [_DOT_K, _DOT_J outputs]; gradient contraction: [_DOT_J p, _DOT_K positions]
# x [_DOT_K positions, _DOT_J q].
_DOT_R = tl.constexpr(32)
_DOT_K = tl.constexpr(16)
_DOT_J = tl.constexpr(32)


@triton.jit
def _copy_rows(src, src_stride, dst, dst_stride, width, n_rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst[m, :width] = src[m, :width] (cast to dst's type) for the first n_rows rows of the block."""
    rows = tl.arange(0, BLOCK_M)[:, None]
    for n0 in range(0, width, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)[None, :]
        mask = (rows < n_rows) & (cols < width)
        v = tl.load(src + (rows * src_stride + cols), mask=mask, other=0.0)
        tl.store(dst + (rows * dst_stride + cols), v.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _mode_product_gather(src, src_stride, dst, dst_stride, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_mode_product on FMA units: tiles of BLOCK_N flattened outputs (a, j, c) per row, each a
    runtime loop over t; lanes run over the flattened outputs, so odd or tiny factors waste none."""
    acc_ty = fac.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)[:, None]
    rows_ok = rows < n_rows
    jc = n_out * c
    tc = n_in * c
    for n0 in range(0, w_out, BLOCK_N):
        # Column indices stay 2-D ([1, BLOCK_N]) so they share the tile's layout: no shuffles in the loop.
        o = n0 + tl.arange(0, BLOCK_N)[None, :]
        o_ok = o < w_out
        ai = o // jc
        rem = o - ai * jc
        j = rem // c
        ci = rem - j * c
        mask = rows_ok & o_ok
        src_off = rows * src_stride + (ai * tc + ci)
        fac_off = j * s_out
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
        for t in range(n_in):
            # Both loads are gathers that hit L1/L2: the block's rows and the factor are tiny.
            f = tl.load(fac + (fac_off + t * s_in), mask=o_ok, other=0.0)
            v = tl.load(src + (src_off + t * c), mask=mask, other=0.0)
            acc += v.to(acc_ty) * f
        tl.store(dst + (rows * dst_stride + o), acc.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _mode_product_dot(src, src_stride, dst, dst_stride, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows):
    """_mode_product for factors with both dims >= _DOT_K: a GEMM of the (m, a, c) positions
    (gathered rows of n_in values) by the n_in x n_out factor, with tl.dot on register tiles, so each
    gathered value serves _DOT_J outputs instead of one."""
    acc_ty = fac.dtype.element_ty
    jc = n_out * c
    tc = n_in * c
    ac = w_out // jc * c
    n_r = n_rows * ac
    kk = tl.arange(0, _DOT_K)
    jj = tl.arange(0, _DOT_J)[None, :]
    for r0 in range(0, n_r, _DOT_R):
        r = r0 + tl.arange(0, _DOT_R)[:, None]
        r_ok = r < n_r
        m = r // ac
        rem = r - m * ac
        ai = rem // c
        ci = rem - ai * c
        src_row = m * src_stride + ai * tc + ci
        dst_row = m * dst_stride + ai * jc + ci
        for j0 in range(0, n_out, _DOT_J):
            j = j0 + jj
            j_ok = j < n_out
            acc = tl.zeros([_DOT_R, _DOT_J], dtype=acc_ty)
            for k0 in tl.range(0, n_in, _DOT_K, num_stages=1):
                tk = k0 + kk[None, :]
                v = tl.load(src + (src_row + tk * c), mask=r_ok & (tk < n_in), other=0.0).to(acc_ty)
                tk = k0 + kk[:, None]
                f = tl.load(fac + (tk * s_in + j * s_out), mask=(tk < n_in) & j_ok, other=0.0)
                acc = tl.dot(v, f, acc, input_precision="tf32")
            tl.store(dst + (dst_row + j * c), acc.to(dst.dtype.element_ty), mask=r_ok & j_ok)


@triton.jit
def _mode_product(src, src_stride, dst, dst_stride, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """dst[m, a, j, c] = Σ_t src[m, a, t, c] · fac[t * s_in + j * s_out] for the first n_rows rows m.

    src rows are (a, n_in, c) tensors, dst rows (a, n_out, c) tensors of w_out = a * n_out * c
    elements; the strides let the same code apply a factor or its transpose.
    """
    if USE_DOT and (n_in >= _DOT_K) & (n_out >= _DOT_K):
        _mode_product_dot(src, src_stride, dst, dst_stride, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows)
    else:
        _mode_product_gather(src, src_stride, dst, dst_stride, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                             BLOCK_M, BLOCK_N)


@triton.jit
def _kron_fwd_kernel(x_ptr, y_ptr, fac_ptr, meta_ptr, ws_ptr, M, P, Q, k, fac_group_stride, ws_slot,
                     n_row_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """y[g, m] = x[g, m] @ (A_1[g] ⊗ ... ⊗ A_k[g]) by k mode products in the order of the meta table.

    Grid (G, programs per group); each program loops over its row blocks (persistent), so the
    workspace is sized by the grid, not by M. Meta entry s: n_in, n_out, factor offset, factor stride
    along n_in, along n_out, c, width in, width out. Step s reads x (s = 0) or scratch slot (s+1)%2
    and writes y (s = k-1) or slot s%2.
    """
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    nprog_m = tl.num_programs(1)
    ws = ws_ptr + (g * nprog_m + pid_m).to(tl.int64) * (2 * ws_slot)
    fac_g = fac_ptr + g.to(tl.int64) * fac_group_stride
    for rb in range(pid_m, n_row_blocks, nprog_m):
        m0 = rb * BLOCK_M
        n_rows = tl.minimum(M - m0, BLOCK_M)
        row0 = g.to(tl.int64) * M + m0
        x_blk = x_ptr + row0 * P
        y_blk = y_ptr + row0 * Q
        for s in range(k):
            mp = meta_ptr + s * 8
            n_in = tl.load(mp)
            n_out = tl.load(mp + 1)
            fac = fac_g + tl.load(mp + 2)
            s_in = tl.load(mp + 3)
            s_out = tl.load(mp + 4)
            c = tl.load(mp + 5)
            w_in = tl.load(mp + 6)
            w_out = tl.load(mp + 7)
            src_ws = ws + ((s + 1) % 2) * ws_slot
            dst_ws = ws + (s % 2) * ws_slot
            # x, y and the scratch have different element types, hence one call per combination.
            if s == 0:
                if k == 1:
                    _mode_product(x_blk, w_in, y_blk, w_out, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                                  BLOCK_M, BLOCK_N, USE_DOT)
                else:
                    _mode_product(x_blk, w_in, dst_ws, w_out, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                                  BLOCK_M, BLOCK_N, USE_DOT)
            else:
                if s == k - 1:
                    _mode_product(src_ws, w_in, y_blk, w_out, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                                  BLOCK_M, BLOCK_N, USE_DOT)
                else:
                    _mode_product(src_ws, w_in, dst_ws, w_out, fac, n_in, n_out, s_in, s_out, c, w_out, n_rows,
                                  BLOCK_M, BLOCK_N, USE_DOT)
            # The next step (or the next row block) reads what other threads of the program wrote.
            tl.debug_barrier()


@triton.jit
def _contract_gather(s_src, s_stride, b_src, b_stride, part, red, n_p, n_q, c, n_ac, n_rows,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_contract_modes on FMA units. Lanes are split into groups of `pt` (p, q) pairs with
    `nsub` lanes per pair striding over the (a, c) positions, so a 2 x 2 factor keeps the lanes as
    busy as a 64 x 64 one. The lanes of one pair are then summed in a fixed order through the
    scratch `red` (deterministic)."""
    acc_ty = part.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)[:, None]
    lane = tl.arange(0, BLOCK_N)[None, :]
    n_pair = n_p * n_q
    pt = tl.minimum(n_pair, BLOCK_N)
    nsub = BLOCK_N // pt
    sub = lane // pt
    lp = lane - sub * pt
    row_pair_ok = (rows < n_rows) & (sub < nsub)
    s_rows = rows * s_stride
    b_rows = rows * b_stride
    for t0 in range(0, n_pair, pt):
        pair = t0 + lp
        pair_ok = row_pair_ok & (pair < n_pair)
        pi = pair // n_q
        qi = pair - pi * n_q
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
        for ac0 in range(0, n_ac, nsub):
            ac = ac0 + sub
            ai = ac // c
            ci = ac - ai * c
            mask = pair_ok & (ac < n_ac)
            sv = tl.load(s_src + (s_rows + (ai * (n_p * c) + pi * c + ci)), mask=mask, other=0.0)
            bv = tl.load(b_src + (b_rows + (ai * (n_q * c) + qi * c + ci)), mask=mask, other=0.0)
            acc += sv * bv
        tl.store(red + lane, tl.sum(acc, axis=0, keep_dims=True))
        tl.debug_barrier()
        out_ok = (lane < pt) & (t0 + lane < n_pair)
        tot = tl.zeros([1, BLOCK_N], dtype=acc_ty)
        for si in range(nsub):
            tot += tl.load(red + (si * pt + lane), mask=out_ok, other=0.0)
        old = tl.load(part + (t0 + lane), mask=out_ok, other=0.0)
        # Values are replicated over threads: all reads of `red`/`part` must precede the writes.
        tl.debug_barrier()
        tl.store(part + (t0 + lane), old + tot, mask=out_ok)


@triton.jit
def _split_row(r, n_ac, c):
    """Position r of the (m, a, c) contraction order -> (row m, a, c)."""
    m = r // n_ac
    rem = r - m * n_ac
    ai = rem // c
    return m, ai, rem - ai * c


@triton.jit
def _contract_dot(s_src, s_stride, b_src, b_stride, part, n_p, n_q, c, n_ac, n_rows):
    """_contract_modes for factors with both dims >= _DOT_K: part += S^T B as a GEMM over the
    (m, a, c) positions, with tl.dot on [p, r] x [r, q] register tiles."""
    acc_ty = part.dtype.element_ty
    n_r = n_rows * n_ac
    rr = tl.arange(0, _DOT_K)
    pj = tl.arange(0, _DOT_J)
    for p0 in range(0, n_p, _DOT_J):
        pi = p0 + pj[:, None]
        for q0 in range(0, n_q, _DOT_J):
            qi = q0 + pj[None, :]
            acc = tl.zeros([_DOT_J, _DOT_J], dtype=acc_ty)
            for r0 in tl.range(0, n_r, _DOT_K, num_stages=1):
                r = r0 + rr[None, :]
                m, ai, ci = _split_row(r, n_ac, c)
                st = tl.load(s_src + (m * s_stride + ai * (n_p * c) + ci + pi * c), mask=(r < n_r) & (pi < n_p),
                             other=0.0)
                r = r0 + rr[:, None]
                m, ai, ci = _split_row(r, n_ac, c)
                bv = tl.load(b_src + (m * b_stride + ai * (n_q * c) + ci + qi * c), mask=(r < n_r) & (qi < n_q),
                             other=0.0)
                acc = tl.dot(st, bv, acc, input_precision="tf32")
            mask = (pi < n_p) & (qi < n_q)
            ptrs = part + (pi * n_q + qi)
            old = tl.load(ptrs, mask=mask, other=0.0)
            # Tile values may be replicated over threads: all reads must precede the writes.
            tl.debug_barrier()
            tl.store(ptrs, old + acc, mask=mask)


@triton.jit
def _contract_modes(s_src, s_stride, b_src, b_stride, part, red, n_p, n_q, c, n_ac, n_rows,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """part[p, q] += Σ_{m, a, c} S[m, a, p, c] · B[m, a, q, c] over the first n_rows rows m; S rows
    are (a, n_p, c) tensors, B rows (a, n_q, c) tensors, n_ac = a * c."""
    if USE_DOT and (n_p >= _DOT_K) & (n_q >= _DOT_K):
        _contract_dot(s_src, s_stride, b_src, b_stride, part, n_p, n_q, c, n_ac, n_rows)
    else:
        _contract_gather(s_src, s_stride, b_src, b_stride, part, red, n_p, n_q, c, n_ac, n_rows, BLOCK_M, BLOCK_N)


@triton.jit
def _kron_grad_factors_kernel(x_ptr, gy_ptr, fac_ptr, meta_ptr, ws_ptr, part_ptr, M, P, Q, k, fac_group_stride,
                              ws_prog, b_off, b_slot, red_off, n_row_blocks,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """Per-program partial sums of dL/dA_i[p, q] = Σ_{rows, a, c} S_i[a, p, c] · B_i[a, q, c], where
    S_i = x with modes l > i multiplied by A_l (suffix sweep from x) and B_i = grad_y with modes l < i
    multiplied by A_l^T (prefix sweep from grad_y); a runs over modes < i (p-space), c over modes > i
    (q-space).

    Meta entry i (mode order): p, q, factor offset, c, a, offset of S_i's scratch slot (in rows of
    width 1), width of S_i (a p c), width of B_i (a q c). Workspace per program: all S_i slots, two
    B slots at b_off, the lane-reduction scratch at red_off. Partials: one packed factor set per
    (program, group), reduced by the launcher.
    """
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    nprog_m = tl.num_programs(1)
    prog = g * nprog_m + pid_m
    ws = ws_ptr + prog.to(tl.int64) * ws_prog
    part = part_ptr + prog.to(tl.int64) * fac_group_stride
    red = ws + red_off
    fac_g = fac_ptr + g.to(tl.int64) * fac_group_stride
    for rb in range(pid_m, n_row_blocks, nprog_m):
        m0 = rb * BLOCK_M
        n_rows = tl.minimum(M - m0, BLOCK_M)
        row0 = g.to(tl.int64) * M + m0
        # Suffix sweep: S_k = x, S_{i-1} = S_i x_i A_i.
        last = meta_ptr + (k - 1) * 8
        _copy_rows(x_ptr + row0 * P, P, ws + tl.load(last + 5) * BLOCK_M, P, P, n_rows, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        for t in range(k - 1):
            mp = meta_ptr + (k - 1 - t) * 8
            n_p = tl.load(mp)
            n_q = tl.load(mp + 1)
            c = tl.load(mp + 3)
            w_s = tl.load(mp + 6)
            w_b = tl.load(mp + 7)
            # S_{i-1} has a_i * q_i * c_i elements, the width of B_i.
            _mode_product(ws + tl.load(mp + 5) * BLOCK_M, w_s, ws + tl.load(mp - 8 + 5) * BLOCK_M, w_b,
                          fac_g + tl.load(mp + 2), n_p, n_q, n_q, 1, c, w_b, n_rows, BLOCK_M, BLOCK_N,
                          USE_DOT)
            tl.debug_barrier()
        # Prefix sweep: B_1 = grad_y, B_{i+1} = B_i x_i A_i^T, contracted with S_i on the way.
        _copy_rows(gy_ptr + row0 * Q, Q, ws + b_off, Q, Q, n_rows, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        for i in range(k):
            mp = meta_ptr + i * 8
            n_p = tl.load(mp)
            n_q = tl.load(mp + 1)
            off = tl.load(mp + 2)
            c = tl.load(mp + 3)
            a = tl.load(mp + 4)
            w_s = tl.load(mp + 6)
            w_b = tl.load(mp + 7)
            b_cur = ws + b_off + (i % 2) * b_slot
            s_cur = ws + tl.load(mp + 5) * BLOCK_M
            _contract_modes(s_cur, w_s, b_cur, w_b, part + off, red, n_p, n_q, c, a * c, n_rows, BLOCK_M, BLOCK_N,
                            USE_DOT)
            if i < k - 1:
                # B_{i+1} has a_i * p_i * c_i elements, the width of S_i.
                _mode_product(b_cur, w_b, ws + b_off + ((i + 1) % 2) * b_slot, w_s, fac_g + off, n_q, n_p, 1, n_q,
                              c, w_s, n_rows, BLOCK_M, BLOCK_N, USE_DOT)
            tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _use_dot(dtype: torch.dtype) -> bool:
    """tl.dot (tf32 tensor cores) for 16-bit inputs only: rounding the fp32 intermediates to tf32
    costs less than the 16-bit output rounding; fp32/fp64 inputs keep exact FMA accumulation."""
    return dtype in (torch.bfloat16, torch.float16)


def _block_m(m: int, width: int, acc_dtype: torch.dtype) -> int:
    """32 rows per program unless the rows are few or wide (a program's scratch should fit in L1/L2)."""
    row_bytes = width * (8 if acc_dtype == torch.float64 else 4)
    return 32 if m > 16 and row_bytes <= 2048 else 16


def _programs_per_group(device: torch.device, n_row_blocks: int, groups: int) -> int:
    """Persistent grid: about 4 programs per SM in total, so the workspace does not grow with M."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter runs programs one by one; a small grid still exercises the row-block loop.
        target = 4
    return max(1, min(n_row_blocks, -(-target // groups)))


def _on_device(device: torch.device) -> torch.cuda.device:
    """Triton launches on the current CUDA device, which need not be the tensors' device (index -1
    makes this a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(device if device.type == "cuda" else -1)


# Meta tables by (kind, factor dims, transpose, device): built once per shape, so a launch does not
# pay a host-to-device copy.
_PLANS: dict = {}


def _cached(key, build):
    if key not in _PLANS:
        _PLANS[key] = build()
    return _PLANS[key]


def _pack_factors(factors: list[torch.Tensor], acc_dtype: torch.dtype) -> torch.Tensor:
    """All factors of all groups in one (G, Σ p_i q_i) buffer of the accumulation dtype."""
    g = factors[0].shape[0]
    return torch.cat([f.reshape(g, -1) for f in factors], dim=1).to(acc_dtype).contiguous()


def _fwd_order(dims: tuple[tuple[int, int], ...]) -> list[int]:
    """Mode order minimising the work Σ_s width_s · q_s: swapping neighbours i, j pays off unless
    1/p_i - 1/q_i <= 1/p_j - 1/q_j, so shrinking factors go first."""
    return sorted(range(len(dims)), key=lambda l: 1.0 / dims[l][0] - 1.0 / dims[l][1])


def _fwd_plan(dims: tuple[tuple[int, int], ...], transpose: bool, device: torch.device):
    """Meta table (see _kron_fwd_kernel) and the widest intermediate row for the given factor dims.

    transpose applies A_l^T (shape q_l x p_l) instead of A_l, reading the same packed buffer."""
    offs, o = [], 0
    for p, q in dims:
        offs.append(o)
        o += p * q
    eff = [(q, p) if transpose else (p, q) for p, q in dims]
    cur = [n_in for n_in, _ in eff]
    meta, widths = [], []
    for l in _fwd_order(tuple(eff)):
        n_in, n_out = eff[l]
        p, q = dims[l]
        s_in, s_out = (1, q) if transpose else (q, 1)
        c = 1
        for d in cur[l + 1:]:
            c *= d
        w_in = 1
        for d in cur:
            w_in *= d
        cur[l] = n_out
        w_out = w_in // n_in * n_out
        meta += [n_in, n_out, offs[l], s_in, s_out, c, w_in, w_out]
        widths.append(w_out)
    w_max = max(widths[:-1], default=1)
    return torch.tensor(meta, dtype=torch.int32, device=device), w_max


def _launch_fwd(x: torch.Tensor, factors: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    g, m, _ = x.shape
    dims = tuple((f.shape[1], f.shape[2]) for f in factors)
    p = 1
    q = 1
    for a, b in dims:
        p *= a
        q *= b
    if transpose:
        p, q = q, p
    y = torch.empty((g, m, q), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if p == 0:
        return y.zero_()
    acc = acc_dtype(x.dtype)
    fac = _pack_factors(factors, acc)
    meta, w_max = _cached(("fwd", dims, transpose, x.device), lambda: _fwd_plan(dims, transpose, x.device))
    block_m = _block_m(m, w_max, acc)
    n_rb = triton.cdiv(m, block_m)
    nprog = _programs_per_group(x.device, n_rb, g)
    ws_slot = block_m * w_max
    ws = torch.empty(g * nprog * 2 * ws_slot, dtype=acc, device=x.device)
    with _on_device(x.device):
        _kron_fwd_kernel[(g, nprog)](x, y, fac, meta, ws, m, p, q, len(factors), fac.shape[1], ws_slot, n_rb,
                                     BLOCK_M=block_m, BLOCK_N=_FWD_TILE // block_m,
                                     USE_DOT=_use_dot(x.dtype), num_warps=_NUM_WARPS)
    return y


def kron_matmul_fwd(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """y[g] = x[g] @ (factors[0][g] ⊗ ... ⊗ factors[k-1][g]); x (G, M, P), factors[i] (G, p_i, q_i).

    One launch; accumulates in fp32 (fp64 for fp64 inputs), returns x's dtype."""
    return _launch_fwd(x, factors, transpose=False)


def _grad_plan(dims: tuple[tuple[int, int], ...], device: torch.device):
    """Meta table (see _kron_grad_factors_kernel), Σ_i width(S_i) and max_i width(B_i)."""
    meta, o, s_off, b_max = [], 0, 0, 1
    for i, (p, q) in enumerate(dims):
        a = 1
        for d, _ in dims[:i]:
            a *= d
        c = 1
        for _, d in dims[i + 1:]:
            c *= d
        w_s, w_b = a * p * c, a * q * c
        meta += [p, q, o, c, a, s_off, w_s, w_b]
        o += p * q
        s_off += w_s
        b_max = max(b_max, w_b)
    return torch.tensor(meta, dtype=torch.int32, device=device), s_off, b_max


def _launch_grad_factors(grad_y: torch.Tensor, x: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    g, m, p = x.shape
    q = grad_y.shape[2]
    dims = tuple((f.shape[1], f.shape[2]) for f in factors)
    acc = acc_dtype(x.dtype)
    if g * m * p * q == 0:
        return [torch.zeros_like(f) for f in factors]
    fac = _pack_factors(factors, acc)
    meta, s_total, b_max = _cached(("grad", dims, x.device), lambda: _grad_plan(dims, x.device))
    block_m = _block_m(m, max(s_total, b_max), acc)
    n_rb = triton.cdiv(m, block_m)
    nprog = _programs_per_group(x.device, n_rb, g)
    b_off = block_m * s_total
    b_slot = block_m * b_max
    red_off = b_off + 2 * b_slot
    block_n = _GRAD_TILE // block_m
    ws_prog = red_off + block_n
    ws = torch.empty(g * nprog * ws_prog, dtype=acc, device=x.device)
    part = torch.zeros((g, nprog, fac.shape[1]), dtype=acc, device=x.device)
    with _on_device(x.device):
        _kron_grad_factors_kernel[(g, nprog)](x, grad_y, fac, meta, ws, part, m, p, q, len(factors), fac.shape[1],
                                              ws_prog, b_off, b_slot, red_off, n_rb,
                                              BLOCK_M=block_m, BLOCK_N=block_n,
                                              USE_DOT=_use_dot(x.dtype), num_warps=_NUM_WARPS)
    # Fixed-order reduction over programs keeps the result deterministic.
    flat = part.sum(dim=1)
    grads, o = [], 0
    for f, (a, b) in zip(factors, dims):
        # copy: slices of one buffer would alias each other as custom-op outputs
        grads.append(flat[:, o:o + a * b].reshape(g, a, b).to(f.dtype, copy=True))
        o += a * b
    return grads


def kron_matmul_bwd(grad_y: torch.Tensor, x: torch.Tensor, factors: list[torch.Tensor], need_x: bool,
                    need_factors: bool) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """Gradients of y = x @ (A_1 ⊗ ... ⊗ A_k).

    grad_x = grad_y @ (A_1^T ⊗ ... ⊗ A_k^T); grad_A_i[p, q] = Σ_{rows, a, c} S_i[a, p, c] B_i[a, q, c]
    with S_i = x ×_{l>i} A_l and B_i = grad_y ×_{l<i} A_l^T (see _kron_grad_factors_kernel)."""
    grad_x = _launch_fwd(grad_y, factors, transpose=True) if need_x else None
    grad_f = _launch_grad_factors(grad_y, x, factors) if need_factors else None
    return grad_x, grad_f



def aot_specs() -> list[tuple[str, triton.JITFunction, dict, dict]]:
    """Every (name, kernel, signature, constexprs) the launchers can use, for ahead-of-time compiles."""
    specs = []
    for dtype, ty in _TL_TYPE.items():
        acc = "*" + _TL_TYPE[acc_dtype(dtype)]
        for bm in _AOT_BLOCK_M:
            fwd_sig = {"x_ptr": "*" + ty, "y_ptr": "*" + ty, "fac_ptr": acc, "meta_ptr": "*i32", "ws_ptr": acc}
            fwd_sig.update({n: "i32" for n in ("M", "P", "Q", "k", "fac_group_stride", "ws_slot", "n_row_blocks")})
            specs.append((f"kron_fwd_{ty}_bm{bm}", _kron_fwd_kernel, fwd_sig,
                          {"BLOCK_M": bm, "BLOCK_N": _FWD_TILE // bm, "USE_DOT": _use_dot(dtype)}))
            grad_sig = {"x_ptr": "*" + ty, "gy_ptr": "*" + ty, "fac_ptr": acc, "meta_ptr": "*i32", "ws_ptr": acc,
                        "part_ptr": acc}
            grad_sig.update({n: "i32" for n in ("M", "P", "Q", "k", "fac_group_stride", "ws_prog", "b_off", "b_slot",
                                                "red_off", "n_row_blocks")})
            specs.append((f"kron_grad_factors_{ty}_bm{bm}", _kron_grad_factors_kernel, grad_sig,
                          {"BLOCK_M": bm, "BLOCK_N": _GRAD_TILE // bm, "USE_DOT": _use_dot(dtype)}))
    return specs
