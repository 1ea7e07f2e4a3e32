"""PEFT adapters on specops ops: a frozen nn.Linear or nn.Conv2d (ZipLoRA: nn.Linear only) plus one method's trainable update.

An adapter wraps a base layer with weight W0 (out = m, in = n), y = x W0^T + b, and starts as the
identity update (ZipLoRA starts as the plain sum of its two LoRAs, see `ZipLoRA`). Every method but
ZipLoRA also wraps an nn.Conv2d (groups=1, zero padding); CONV_METHODS names them. LoRA, LoHa and
LoKr take LyCORIS's conv forms (LoCon, LoHa, LoKr; see each class). The rebuild methods work on
the kernel as the matrix W0 (out, in·kh·kw), flattened in F.unfold's column order: the method gives
the adapted matrix W, reshaped back to (out, in, kh, kw) and run as one conv with the base's stride,
padding and dilation. An input-side rotation then acts on in·kh·kw, and n below reads in·kh·kw.
Two kinds:

  additive  (LoRA, LoHa, LoKr, AdaLoRA, ZipLoRA):  y = x W0^T + b + scale · x ΔW'^T,  ΔW = scale · ΔW'
  rebuild   (OFT, BOFT, KOFT, SVDiff, SODA-SVD, SODA-LQ): the method gives the adapted weight W itself;
            scale 1 runs the adapted layer y = x W^T + b, any other scale s runs
            y = base(x) + s (x W^T - x W0^T), so ΔW = s (W - W0).

    method      ΔW' or W                                            trainable
    lora        (alpha/r) B A                                       A (r, n), B (m, r) = 0
    loha        (alpha/r) (B1 A1) ⊙ (B2 A2)                         A1, B1 = 0, A2, B2
    lokr        c W1 ⊗ W2  (W_i dense or B_i A_i; c = alpha/r or 1)   W1 (m1, n1) or B1 = 0; W2 or B2, A2
    adalora     c P diag(λ) Q  (c = alpha/(init_r + 1e-5))           P (m, r), Q (r, n) ~ N(0, 0.02²), λ = 0
    oft         W = W0 R, R = diag(cayley(Q_i - Q_i^T))             Q (b, n/b, n/b) = 0
                (side "output": W = R W0, R over m; optional
                 rescale W = diag(g) ..., LyCORIS's diag-oft)        g (m,) = 1
    boft        W = W0 R, R = B_{m-1} ⋯ B_0, B_i = Π_i^T diag(cayley(.)) Π_i   Q (m, n/b, b, b) = 0
                (butterfly stages; side "output" and rescale as OFT's)
    koft        W = W0 (R_1 ⊗ ... ⊗ R_r)                            R_i = I (Stiefel)
    svdiff      W = U diag(act(S + δ)) Vh                           δ (k,) = 0
    soda-svd    svdiff rotated by R_1 ⊗ ... ⊗ R_r (side "input" or "basis")   δ, R_i = I (Stiefel)
    soda-lq     W = (L + diag(δ)) Qh, rotated likewise              δ, R_i = I (Stiefel)
    ziplora     s_c B_c A_c diag(m_c) + s_s B_s A_s diag(m_s)       m_c, m_s (n,)

LoRA, LoHa and LoKr take dora=True (LyCORIS's weight decomposition, DoRA; see `Adapter`): a
trainable magnitude rescales W0 + ΔW' per output row (or per input column) instead of adding ΔW'.

Spectral adapters decompose W0 once, in float64, with canonical signs (specops.decompose: the
largest-|.| entry of every u_i positive; diag(L) >= 0), so a saved "basis" rotation means the same
on any LAPACK build. The factors are recomputable from W0, hence non-persistent buffers; a
state_dict holds the base layer and the trainable parameters only.

Precision: parameters are kept in the base weight's dtype, except for bf16/fp16 bases where
  - the spectral factors, δ, OFT's rescale g and every Stiefel factor are float32: a bf16
    U diag(S) Vh reproduces W0 only to ~1e-2, and an orthogonal matrix, a small δ or a g near 1
    cannot be held in 8 mantissa bits;
  - spectral layers and rotations compute in float32 (the input is cast up and the output down);
    so do the rebuilt conv layers, and OFT's output side.
Cast a model to its final dtype before injecting adapters.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _registry
from ._constants import acc_dtype
from .kron import block_diag_matmul, kron, kron_matmul
from .spectral import (
    ACTIVATIONS,
    SIDES,
    SODA_TABLE,
    decompose,
    kron_factor_sizes,
    lora_linear,
    lowrank_linear,
    scaled_matmul,
    spectral_linear,
    spectral_linear_lq,
    spectral_shift,
    spectral_shift_lq,
)
from .stiefel import cayley
from .zip import _check_linear, _lora_parts, zip_lora_linear, zip_merge_lora

__all__ = ["Adapter", "LoRA", "LoHa", "LoKr", "AdaLoRA", "OFT", "BOFT", "KOFT", "SVDiff", "SODASVD", "SODALQ", "ZipLoRA",
           "ADAPTER_TYPES", "CONV_METHODS", "OFT_SIDES", "ADALORA_ORTHOGONAL", "make_adapter",
           "butterfly", "butterfly_rows", "butterfly_gathers", "boft_max_stages", "BUTTERFLY_ROWS_MAX_STAGES"]


# ----------------------------------------------------------------------------- helpers


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def _uniform(rows: int, cols: int, like: Tensor) -> Tensor:
    """U(-1/sqrt(cols), 1/sqrt(cols)), like nn.Linear's default init with fan-in `cols`."""
    bound = cols**-0.5
    return torch.empty(rows, cols, dtype=like.dtype, device=like.device).uniform_(-bound, bound)


def _kron_sizes(dim: int, what: str, factors, sizes, table=None) -> tuple[int, ...]:
    """Rotation factor sizes multiplying to `dim`: `sizes` checked, or balanced (kron_factor_sizes).

    factors=None means len(sizes), or 3 without sizes. A dimension with too few prime factors gets
    degenerate factors of size 1 (a prime dim is then one full dim x dim factor).
    """
    if sizes is None:
        k = _positive_int("factors", 3 if factors is None else factors)
        # Table entries with another factor count do not apply (kron_factor_sizes would reject them).
        table = {d: s for d, s in (table or {}).items() if len(s) == k}
        return kron_factor_sizes(dim, k, table=table, allow_ones=True)
    if isinstance(sizes, (str, Tensor)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"sizes: expected a non-empty list of factor sizes, got {sizes!r}")
    sizes = tuple(_positive_int(f"sizes[{i}]", p) for i, p in enumerate(sizes))
    if factors is not None and len(sizes) != factors:
        raise ValueError(f"sizes: expected factors={factors} sizes, got {len(sizes)}: {sizes}")
    if math.prod(sizes) != dim:
        raise ValueError(
            f"sizes: expected sizes whose product is {what} = {dim}, got {sizes} (product {math.prod(sizes)})"
        )
    return sizes


def _identity_factors(sizes: Sequence[int], dtype: torch.dtype, device) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.eye(p, dtype=dtype, device=device)) for p in sizes])


# ----------------------------------------------------------------------------- base class


def _conv_options(W0: Tensor, rank, alpha, conv_rank, conv_alpha, tucker):
    """(rank, alpha, the rank option's name): a kernel above 1x1 takes conv_rank / conv_alpha when
    given (LyCORIS's conv_dim / conv_alpha); a Linear or 1x1 conv keeps rank / alpha."""
    if not isinstance(tucker, bool):
        raise ValueError(f"tucker: expected a bool, got {tucker!r}")
    if not _spatial(W0):
        return rank, alpha, "rank"
    alpha = alpha if conv_alpha is None else conv_alpha
    return (rank, alpha, "rank") if conv_rank is None else (conv_rank, alpha, "conv_rank")


def _axis_shape(W: Tensor, on_out: bool) -> tuple[int, ...]:
    """The shape of one norm per output row (on_out) or per input column, broadcastable to W."""
    shape = [1] * W.dim()
    shape[0 if on_out else 1] = W.shape[0 if on_out else 1]
    return tuple(shape)


def _axis_norm(W: Tensor, on_out: bool) -> Tensor:
    """L2 norm of each output row (on_out) or input column of W, over every other dim, kept as dims."""
    dims = tuple(d for d in range(W.dim()) if d != (0 if on_out else 1))
    return torch.linalg.vector_norm(W, dim=dims, keepdim=True)


def _run_layer(base: nn.Module, x: Tensor, W: Tensor) -> Tensor:
    """The base layer run with weight W: one Linear, or one conv with the base's geometry."""
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, W, base.bias, base.stride, base.padding, base.dilation)
    return F.linear(x, W, base.bias)


class Adapter(nn.Module):
    """Wraps a frozen nn.Linear `base` (kept as self.base, weight/bias requires_grad False), or an
    nn.Conv2d for the methods whose `bases` include it (CONV_METHODS).

    forward: base(x) when fused or scale == 0, else the method's adapted layer (module docstring).
    delta_weight(): ΔW (out, in) — (out, in, kh, kw) on a conv — including scale, differentiable;
    fuse() adds it to base.weight and unfuse() restores the original weight bit-exactly. `scale`
    may be changed at any time (block weights); it is read at every forward.

    DoRA (dora=True on LoRA, LoHa, LoKr; LyCORIS 4.1.3's weight_decompose): with ΔW' the method's
    update at scale 1 (alpha/rank included), W = W0 + ΔW' and a trainable magnitude m,
        W' = W ⊙ (1 + s·(m / (‖W‖ + eps) − 1)),    s = scale, eps = finfo(m.dtype).eps,
    ‖W‖ the L2 norm of each output row over (in, kh, kw) (wd_on_out=True, LyCORIS's default), or of
    each input column over (out, kh, kw) (wd_on_out=False); m is (out,) or (in,), initialised to
    that norm of W0, so a fresh adapter is W0 up to the eps. At s = 1 this is m ⊙ W / ‖W‖. The
    scale follows LyCORIS's multiplier rule: it blends the rescaling, not ΔW', so at s = 0 the
    layer runs W0 + ΔW' (not W0) and a DoRA adapter has no scale at which it is off. The norm is
    not detached (gradients flow through it, as in LyCORIS; PEFT's use_dora detaches it and has no
    eps, which changes the gradients of the factors but not the forward values). m and the norm
    are float32 on float16 / bfloat16 bases. Forward builds W' and runs one Linear / conv;
    delta_weight() = W' − W0, so fuse() gives the same output. LyCORIS files hold m as dora_scale,
    (out, 1) / (out, 1, 1, 1), or (1, in) / (1, in, 1, 1) for wd_on_out=False.
    """

    method: ClassVar[str]
    bases: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)  # the layer types this method wraps

    def __init__(self, base: nn.Linear, *, scale: float = 1.0):
        super().__init__()
        if not isinstance(base, self.bases):
            why = f"base: expected an nn.Linear, got {type(base).__name__}"
            if nn.Conv2d in self.bases:
                why += f" ({self.method} also takes an nn.Conv2d)"
            elif isinstance(base, nn.Conv2d):
                why += f"; the methods that take a conv layer are {CONV_METHODS}"
            raise ValueError(why)
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError(f"base: a Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r}; "
                             "conv adapters take groups=1 and zero padding")
        base.requires_grad_(False)
        self.base = base
        self.scale = float(scale)
        self.fused = False
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self._options: dict = {}  # resolved constructor options, for config()
        self.register_buffer("_unfused_weight", None, persistent=False)
        self.register_parameter("magnitude", None)  # DoRA's m; see _init_dora
        self.wd_on_out = True

    def _init_dora(self, dora, wd_on_out) -> None:
        """DoRA's magnitude m = the norm of W0 along the wd_on_out axis (class docstring)."""
        if not isinstance(dora, bool) or not isinstance(wd_on_out, bool):
            raise ValueError(f"dora, wd_on_out: expected bools, got {dora!r}, {wd_on_out!r}")
        if not dora:
            return
        W0 = self.base.weight.detach().to(acc_dtype(self.base.weight.dtype))
        self.wd_on_out = wd_on_out
        self.magnitude = nn.Parameter(_axis_norm(W0, wd_on_out).flatten())
        self._options.update(dora=True, wd_on_out=wd_on_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self.base(x)
        if self.magnitude is not None:  # no scale turns DoRA off (class docstring)
            return _run_layer(self.base, x, self.dora_weight().to(self.base.weight.dtype))
        if self.scale == 0.0:
            return self.base(x)
        return self._forward(x)

    def _delta(self, scale: float) -> Tensor:
        """The method's additive ΔW at `scale` (delta_weight() without DoRA)."""
        raise NotImplementedError

    def dora_weight(self) -> Tensor:
        """DoRA's W' (W0's shape, in m's dtype); differentiable. Only with dora=True."""
        if self.magnitude is None:
            raise RuntimeError(f"dora_weight: this {self.method!r} adapter was built without dora=True")
        m = self.magnitude
        W = self._w0().to(m.dtype) + self._delta(1.0).to(m.dtype)
        ratio = m.view(_axis_shape(W, self.wd_on_out)) / (_axis_norm(W, self.wd_on_out) + torch.finfo(m.dtype).eps)
        if self.scale != 1.0:
            ratio = self.scale * (ratio - 1) + 1
        return W * ratio

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _w0(self) -> Tensor:
        """W0: the base weight as it was before fuse()."""
        return self._unfused_weight if self.fused else self.base.weight

    def delta_weight(self) -> Tensor:
        """ΔW = W_adapted - W0 (W0's shape) in the base dtype, scale included; differentiable."""
        if self.magnitude is None:
            return self._delta(self.scale)
        W0 = self._w0()
        return (self.dora_weight() - W0.to(self.magnitude.dtype)).to(W0.dtype)

    def lora_factors(self) -> tuple[Tensor, Tensor] | None:
        """(B, A) with B @ A == delta_weight() exactly, or None when ΔW is not exactly low rank."""
        return None

    def orthogonal_parameters(self) -> list[nn.Parameter]:
        """The parameters that live on the Stiefel manifold (train them with specops.optim)."""
        return []

    def config(self) -> dict:
        """JSON-serialisable options: make_adapter(self.method, base, **config()) rebuilds the shapes."""
        return {**self._options, "scale": self.scale}

    @torch.no_grad()
    def fuse(self) -> None:
        """base.weight += delta_weight(); forward then costs one Linear. Keeps W0 for unfuse()."""
        if self.fused:
            raise RuntimeError(f"fuse: this {self.method!r} adapter is already fused; call unfuse() first")
        delta = self.delta_weight()
        self._unfused_weight = self.base.weight.detach().clone()
        self.base.weight.add_(delta)
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the base weight saved by fuse(), bit-exactly."""
        if not self.fused:
            raise RuntimeError(f"unfuse: this {self.method!r} adapter is not fused")
        self.base.weight.copy_(self._unfused_weight)
        self._unfused_weight = None
        self.fused = False

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"method={self.method!r}, {options}, fused={self.fused}"


# ----------------------------------------------------------------------------- additive methods


class LoRA(Adapter):
    """ΔW = scale·(alpha/rank)·B A, B (out, rank) zero-initialised, A (rank, in) uniform(±1/sqrt(in)).

    init=(B, A) starts from given factors instead (copied, cast to the base dtype); rank is then
    theirs and alpha defaults to rank, so B A is exactly the update. rank=None means 4.
    Forward: base(x) + c·(x A^T) B^T, c = scale·alpha/rank; ΔW is never formed.

    On an nn.Conv2d, W0 (out, in, kh, kw), this is LoCon with LyCORIS's rules (c as above, * a
    convolution, "geometry" the base's stride, padding and dilation):
      plain   A (rank, in, kh, kw) a conv with the base's geometry, B (out, rank) a 1x1 conv:
              ΔW[o, i] = c Σ_r B[o, r] A[r, i],              y = base(x) + c · B * (A * x)
      tucker  A (rank, in) a 1x1 conv, mid (rank, rank, kh, kw) a core with the base's geometry:
              ΔW[o, i] = c Σ_{p,q} B[o, p] mid[p, q] A[q, i],  y = base(x) + c · B * (mid * (A * x))
    A and mid start uniform(±1/sqrt(fan_in)) (kaiming_uniform with a = √5, as LyCORIS), B = 0.
    A 1x1 conv counts as a Linear: rank / alpha, never Tucker. A larger kernel takes conv_rank /
    conv_alpha when given (LyCORIS's conv_dim / conv_alpha), else rank / alpha, and tucker=True
    (LyCORIS's use_tucker) picks the Tucker form; elsewhere conv_rank, conv_alpha and tucker do
    nothing. init=(B, A), or (B, A, mid) for the Tucker form, in the shapes above.
    dora=True: DoRA on that update (see `Adapter`), m (out,) or (in,) for wd_on_out=False;
    lora_factors() and conv_factors() are then None (W' − W0 is not low rank).
    """

    method = "lora"
    bases = (nn.Linear, nn.Conv2d)

    def __init__(self, base: nn.Linear | nn.Conv2d, *, rank: int | None = None, alpha: float | None = None,
                 conv_rank: int | None = None, conv_alpha: float | None = None, tucker: bool = False, init=None,
                 dora: bool = False, wd_on_out: bool = True, scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        m, n = W0.shape[:2]
        kernel = tuple(W0.shape[2:])  # () for a Linear
        spatial = _spatial(W0)
        rank, alpha, rank_name = _conv_options(W0, rank, alpha, conv_rank, conv_alpha, tucker)
        mid = None
        if init is None:
            rank = _positive_int(rank_name, 4 if rank is None else rank)
            if tucker and spatial:
                A = _uniform(rank, n, W0)
                mid = _uniform(rank, rank * math.prod(kernel), W0).view(rank, rank, *kernel)
            else:
                A = _uniform(rank, n * math.prod(kernel), W0).view(rank, n, *kernel)
            B = W0.new_zeros(m, rank)
        else:
            B, A, mid = self._init_factors(init, W0, tucker)
            r = A.shape[0]
            if rank is not None and rank != r:
                raise ValueError(f"{rank_name}: {rank} differs from the rank {r} of the init factors")
            rank = r
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.register_parameter("mid", None if mid is None else nn.Parameter(mid))
        self._options = {"rank": rank, "alpha": self.alpha}
        if self.is_conv:
            self._options["tucker"] = mid is not None
        self._init_dora(dora, wd_on_out)

    @staticmethod
    def _init_factors(init, W0: Tensor, tucker: bool):
        """(B, A, mid or None) from init=(B, A) or (B, A, mid): shapes checked, copied in W0's dtype."""
        m, n = W0.shape[:2]
        kernel = tuple(W0.shape[2:])
        spatial = any(k != 1 for k in kernel)
        forms = "a (B, A) pair of tensors" + (" or a (B, A, mid) triple" if spatial else "")
        if not isinstance(init, (tuple, list)) or len(init) not in (2, 3) or not all(isinstance(t, Tensor) for t in init):
            raise ValueError(f"init: expected {forms}, got {type(init).__name__}")
        if len(init) == 3 and not spatial:
            raise ValueError(f"init: expected {forms}; a (B, A, mid) Tucker triple needs a conv kernel larger than 1x1")
        if tucker and spatial and len(init) == 2:
            raise ValueError("tucker: True, but init is a (B, A) pair; pass (B, A, mid) for the Tucker form")
        B, A, *mid = (t.detach().to(W0).clone() for t in init)
        mid = mid[0] if mid else None
        if kernel:
            want_a = (n,) if mid is not None else (n, *kernel)
            a_form = f"(r, in_channels={n}{', 1x1' if mid is not None else ', kh, kw'}) = (r, {', '.join(map(str, want_a))})"
            b_form = f"out_channels={m}"
        else:
            want_a, a_form, b_form = (n,), f"(r, in_features={n})", f"out_features={m}"
        if A.dim() != 1 + len(want_a) or tuple(A.shape[1:]) != want_a:
            raise ValueError(f"init: A expected shape {a_form}, got {tuple(A.shape)}")
        r = A.shape[0]
        if tuple(B.shape) != (m, r):
            raise ValueError(f"init: B expected shape ({b_form}, r={r}), got {tuple(B.shape)}")
        if mid is not None and tuple(mid.shape) != (r, r, *kernel):
            raise ValueError(f"init: mid expected shape (r, r, kh, kw) = {(r, r, *kernel)}, got {tuple(mid.shape)}")
        return B, A, mid

    def _c(self, scale: float | None = None) -> float:
        return (self.scale if scale is None else scale) * self.alpha / self.rank

    def _forward(self, x):
        if not self.is_conv:
            # one pass onto base's output, c as the diagonal (its gradient unused)
            return lowrank_onto(self.base, x, self.A, self.A.new_full((self.rank,), self._c()), self.B)
        # c goes on the small B; the up-projection is one GEMM that adds onto base(x) (baddbmm)
        B = self.B * self._c()
        conv = self.base
        if self.mid is None:
            return lowrank_conv_onto(conv, x, self.A, B)
        # zero padding commutes with the bias-free 1x1 A, so the core alone pads
        h = F.conv2d(F.conv2d(x, self.A[:, :, None, None]), self.mid, None, *_conv_geometry(conv))
        return _add_up_projection(conv(x), B, h)

    def lora_factors(self):
        """(scale·alpha/rank·B, A); None on a conv, whose ΔW is not a matrix (see conv_factors), or with DoRA."""
        if self.is_conv or self.magnitude is not None:
            return None
        return self.B * self._c(), self.A

    def conv_factors(self) -> tuple[Tensor, ...] | None:
        """On a conv: (scale·alpha/rank·B, A) or, Tucker, (scale·alpha/rank·B, A, mid) — init's
        form with every scale in B, so LoRA(base, init=conv_factors()) has this ΔW. None on a Linear
        or with DoRA."""
        if not self.is_conv or self.magnitude is not None:
            return None
        B = self.B * self._c()
        return (B, self.A) if self.mid is None else (B, self.A, self.mid)

    def _delta(self, scale):
        B = self.B * self._c(scale)
        if not self.is_conv:
            return B @ self.A
        if self.mid is None:
            return (B @ self.A.flatten(1)).view(self.out_features, *self.A.shape[1:])
        return torch.einsum("op,pqhw,qi->oihw", B, self.mid, self.A)


def add_lowrank(y: Tensor, x: Tensor, A: Tensor, s: Tensor, B: Tensor) -> Tensor:
    """y + ((x Aᵀ) diag(s)) Bᵀ over x's rows through lowrank_linear, in y's shape and dtype: the operands in
    x's dtype, or the autocast dtype under torch.autocast (as F.linear would cast them)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, A, s, B = x.to(dtype), A.to(dtype), s.to(dtype), B.to(dtype)
    with torch.autocast(x.device.type, enabled=False):  # lowrank_linear takes one dtype
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(x2.shape[0], -1)
        return lowrank_linear(x2, A, s, B, y2.to(x2.dtype)).to(y2.dtype).view(y.shape)


def _plain_linear(base: nn.Module, x: Tensor, factor: Tensor) -> bool:
    """Whether base(x) is a plain nn.Linear's fresh output in x's and the adapter factor's dtype: no
    hooks, one dtype, no autocast. An adapter may then add its update into that output (nothing else
    holds it, and F.linear's backward does not read it) rather than make another output-sized tensor,
    whose fresh pages cost more than a low-rank update on the CPU."""
    return (type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
            and base.weight.dtype == x.dtype == factor.dtype and not torch.is_autocast_enabled(x.device.type))


def lowrank_onto(base: nn.Module, x: Tensor, A: Tensor, s: Tensor, B: Tensor, run=None) -> Tensor:
    """base(x) + ((x Aᵀ) diag(s)) Bᵀ over x's rows, x (..., n): one lora_linear op (the base GEMM's output
    the only (T, m) tensor made) when base is a _plain_linear; otherwise add_lowrank onto run(x) (default
    base(x)), which takes any base."""
    if _plain_linear(base, x, A):
        x2 = x.reshape(-1, x.shape[-1])
        return lora_linear(x2, base.weight, base.bias, A, s, B).view(*x.shape[:-1], base.out_features)
    return add_lowrank((run or base)(x), x, A, s, B)


def _plain_conv(base: nn.Module, x: Tensor, factor: Tensor) -> bool:
    """_plain_linear's rule for an nn.Conv2d (zero padding, one group, frozen weight) in a plain eager call."""
    return (type(base) is nn.Conv2d and base.groups == 1 and base.padding_mode == "zeros"
            and isinstance(base.padding, tuple) and not base.weight.requires_grad
            and not (base._forward_hooks or base._forward_pre_hooks) and x.dim() == 4 and x.is_contiguous()
            and base.weight.dtype == x.dtype == factor.dtype and not torch.is_autocast_enabled(x.device.type)
            and _registry._eager())


class _ConvUpdate(torch.autograd.Function):
    """update(conv(x, W0), x, *factors) (W0 frozen; the base's geometry and bias) as one node whose input gradient is
    ONE conv_transpose with W0 + delta(*factors) = W0 + ΔW: the update's own input-gradient convs (from 8 or 64
    channels, or LoKr's per-group ones, all far below the base conv's rate) never run. The factors' gradients come
    from the update's graph, built in the forward on x.detach(); under create_graph the update and ΔW are rebuilt
    on x's and the factors' graphs, so a double backward is exact (and the update again for a second backward)."""

    @staticmethod
    def forward(ctx, x, W0, bias, geometry, update, delta, *factors):
        y = F.conv2d(x, W0, bias, *geometry)
        with torch.enable_grad():
            leaves = [f.detach().requires_grad_(f.requires_grad) for f in factors]
            out = update(y, x.detach(), *leaves)
        ctx.save_for_backward(x, W0, *factors)
        ctx.geometry, ctx.update, ctx.delta, ctx.graph = geometry, update, delta, (out, leaves)
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        x, W0, *factors = ctx.saved_tensors
        graph, ctx.graph = ctx.graph, None  # freed now, as autograd frees saved tensors
        create = torch.is_grad_enabled()  # a double backward follows
        gx = gbias = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation = (list(v) for v in ctx.geometry)
            gx = torch.ops.aten.convolution_backward(g, x, W0 + ctx.delta(*factors), None, stride, padding, dilation,
                                                     False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[2]:
            gbias = g.sum((0, 2, 3))
        if create or graph is None:  # on x's graph, or again (a second backward, retain_graph=True)
            leaves = factors if create else [f.detach().requires_grad_(f.requires_grad) for f in factors]
            with torch.enable_grad():
                out = ctx.update(torch.zeros_like(g), x if create else x.detach(), *leaves)
        else:
            out, leaves = graph
        need = [i for i, n in enumerate(ctx.needs_input_grad[6:]) if n]
        got = torch.autograd.grad(out, [leaves[i] for i in need], g, create_graph=create, allow_unused=True)
        fgrads = [None] * len(factors)
        for i, t in zip(need, got):
            fgrads[i] = t
        return gx, None, gbias, None, None, None, *fgrads


def _conv_update(conv: nn.Conv2d, x: Tensor, run, update, delta, *factors) -> Tensor:
    """update(run(x) (default conv(x)), x, *factors): through _ConvUpdate where x requires grad, _plain_conv allows,
    run is None or conv's own forward (a LyCORIS module's org_forward) and ΔW = delta(*factors) is no larger than x
    (building a larger one costs more than the convs it saves: none at 640 or 1280 channels on SDXL's latents).
    320 channels on 2x64x64, fp32, in-network, against the plain path in the same process (fastest of 9-11 rounds,
    ±4% between runs): LoCon 1.16-1.23 -> 1.09-1.17 of the frozen step, LoHa 1.37-1.48 -> 1.27-1.34, LoKr 1.25 -> 1.22."""
    own = run is None or (getattr(run, "__func__", None) is nn.Conv2d.forward
                          and getattr(run, "__self__", None) is conv)
    if (own and x.requires_grad and torch.is_grad_enabled() and conv.weight.numel() <= x.numel()
            and _plain_conv(conv, x, factors[0])):
        return _ConvUpdate.apply(x, conv.weight, conv.bias, _conv_geometry(conv), update, delta, *factors)
    return update((run or conv)(x), x, *factors)


def lowrank_conv_onto(base: nn.Conv2d, x: Tensor, D: Tensor, B: Tensor, run=None) -> Tensor:
    """run(x) (default base(x)) + 1x1(B) * conv(x, D), D (r, in, kh, kw) with base's geometry, B (out, r): LoCon's
    form, which a Conv2d LoRA, AdaLoRA and LoHa (as its rank-r² LoRA) share (_conv_update)."""
    geometry = _conv_geometry(base)
    return _conv_update(base, x, run, lambda y, x, D, B: _add_up_projection(y, B, F.conv2d(x, D, None, *geometry)),
                        lambda D, B: (B @ D.flatten(1)).view_as(base.weight), D, B)


def _add_up_projection(y: Tensor, B: Tensor, h: Tensor) -> Tensor:
    """y + the 1x1 conv of h (N, r, H, W) with B (out, r): one batched GEMM onto y where y and h are
    NCHW-contiguous (a 1x1 conv from r channels runs far below GEMM speed on the CPU)."""
    if y.dim() == 4 and y.is_contiguous() and h.is_contiguous():
        N = y.shape[0]
        return torch.baddbmm(y.view(N, y.shape[1], -1), B.expand(N, -1, -1), h.view(N, h.shape[1], -1)).view_as(y)
    return y + F.conv2d(h, B[:, :, None, None])


def _conv_geometry(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation


def _spatial(W0: Tensor) -> bool:
    """A conv kernel larger than 1x1 (a 1x1 conv counts as a Linear, as in LyCORIS)."""
    return any(k != 1 for k in W0.shape[2:])


def _tucker_rebuild(B: Tensor, T: Tensor, A: Tensor) -> Tensor:
    """Σ_{p,q} B[o, p] T[p, q, h, w] A[q, i]: B (out, r), T (r, r, kh, kw), A (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("op,pqhw,qi->oihw", B, T, A)


ADALORA_ORTHOGONAL = (None, "stiefel")
EPS_RANKNUM = 1e-5  # PEFT's ranknum + 1e-5 in AdaLoRA's scaling
# AdaLoRA's factors: the dim of each that indexes triplets, and the dim an importance is averaged over
ADALORA_TRIPLET_DIM = {"P": 1, "lam": 0, "Q": 0, "Qt": 1}
ADALORA_MEAN_DIM = {"P": 0, "Q": 1, "Qt": 0}
ADALORA_EMAS = ("ema_ipt_", "ema_unc_")  # buffer prefixes: the allocator's smoothed sensitivity, uncertainty


class AdaLoRA(Adapter):
    """AdaLoRA's SVD-form update ΔW = c · P diag(λ) Q, c = scale·alpha / (init_r + 1e-5) (alpha =
    init_r when not given): P (out, r), λ (r,) = 0, Q (r, n) with P, Q ~ N(0, 0.02²), so a fresh
    adapter is W0. These are PEFT's AdaLoRA conventions (its lora_B, lora_E, lora_A and scaling /
    ranknum), so one model's numbers carry over to the other. specops.adalora.RankAllocator masks
    λ by importance; `rank` triplets are computed (init_r, or the kept ones after compact()).

    Forward, Linear: base(x) + c · ((x Qᵀ) diag(λ)) Pᵀ through specops.lowrank_linear (one pass
    over the rows, work proportional to the rank); ΔW is never formed. On an nn.Conv2d, Q is the
    (r, in·kh·kw) matrix of an r-channel conv with the base's geometry and P diag(λ) a 1x1 conv:
    y = base(x) + (c P diag λ) * (Q * x), as LoCon.
    orthogonal="stiefel" keeps P and Q exactly orthonormal instead of regularising them: P and
    Qt = Qᵀ (n, r) start as random orthonormal columns (init_r <= min(out, n)) and are trained by
    a Stiefel optimiser (orthogonal_parameters(), sdxl.param_groups' orthogonal group), λ by any.
    Buffers, in the state_dict and in save_adapters files: ema_ipt_<f> / ema_unc_<f> (the
    allocator's smoothed sensitivity and uncertainty of every entry of each factor f) and
    frozen_mask (r,) (the final phase's kept triplets; all until then).
    """

    method = "adalora"
    bases = (nn.Linear, nn.Conv2d)

    def __init__(self, base: nn.Linear | nn.Conv2d, *, init_r: int = 12, alpha: float | None = None,
                 rank: int | None = None, orthogonal: str | None = None, scale: float = 1.0):
        super().__init__(base, scale=scale)
        self.init_r = _positive_int("init_r", init_r)
        r = init_r if rank is None else _positive_int("rank", rank)
        if r > init_r:
            raise ValueError(f"rank: expected at most init_r = {init_r} triplets, got {r}")
        self.orthogonal = _choice("orthogonal", orthogonal, ADALORA_ORTHOGONAL)
        self.alpha = float(init_r if alpha is None else alpha)
        W0 = base.weight
        out_f, cols = W0.shape[0], W0[0].numel()
        like = dict(dtype=W0.dtype, device=W0.device)
        self.lam = nn.Parameter(W0.new_zeros(r))
        if orthogonal == "stiefel":
            if r > min(out_f, cols):
                raise ValueError(f"init_r: {r} orthonormal triplets need at most min(out, in) = {min(out_f, cols)}")
            onb = lambda n: torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0].to(**like)  # noqa: E731
            self.P, self.Qt = nn.Parameter(onb(out_f)), nn.Parameter(onb(cols))
            self.factors = ("P", "lam", "Qt")
        else:
            self.P = nn.Parameter(torch.randn(out_f, r, **like) * 0.02)
            self.Q = nn.Parameter(torch.randn(r, cols, **like) * 0.02)
            self.factors = ("P", "lam", "Q")
        for f in self.factors:
            for kind in ADALORA_EMAS:
                self.register_buffer(kind + f, torch.zeros_like(getattr(self, f)))
        self.register_buffer("frozen_mask", torch.ones(r, dtype=torch.bool, device=W0.device))
        self._options = {"init_r": init_r, "alpha": self.alpha, "rank": r, "orthogonal": orthogonal}

    def _c(self, scale: float | None = None) -> float:
        return (self.scale if scale is None else scale) * self.alpha / (self.init_r + EPS_RANKNUM)

    def q(self) -> Tensor:
        """Q (r, n) (a transposed view of the parameter Qt under orthogonal="stiefel")."""
        return self.Qt.mT if self.orthogonal == "stiefel" else self.Q

    def _forward(self, x):
        if self.rank == 0:  # every triplet compacted away (a conv refuses 0 channels)
            return self.base(x)
        if self.is_conv:
            conv = self.base
            Q = self.q().reshape(self.rank, *conv.weight.shape[1:])
            return lowrank_conv_onto(conv, x, Q, self.P * (self._c() * self.lam))
        # c goes on the small λ: no output-sized product by c, forward or backward
        return lowrank_onto(self.base, x, self.q(), self._c() * self.lam, self.P)

    def _delta(self, scale):
        return (self._c(scale) * scaled_matmul(self.P, self.lam, self.q())).view(self.base.weight.shape)

    def _kept(self) -> tuple[Tensor, Tensor]:
        """(c·P diag λ, Q) over the triplets with λ != 0: an exact factorisation of ΔW."""
        keep = self.lam != 0
        return self.P[:, keep] * (self._c() * self.lam[keep]), self.q()[keep]

    def lora_factors(self):
        """(B, A) with B @ A == delta_weight(), of the kept rank (λ != 0); None on a conv (conv_factors)."""
        return None if self.is_conv else self._kept()

    def conv_factors(self) -> tuple[Tensor, Tensor] | None:
        """On a conv: (B, A) with A (k, in, kh, kw), LoRA(base, init=conv_factors()) having this ΔW,
        k the kept rank; None on a Linear."""
        if not self.is_conv:
            return None
        B, A = self._kept()
        return B, A.reshape(A.shape[0], *self.base.weight.shape[1:])

    def orthogonal_parameters(self):
        return [self.P, self.Qt] if self.orthogonal == "stiefel" else []

    @property
    def rank(self) -> int:
        """Triplets computed (init_r until compact())."""
        return self.lam.numel()

    @torch.no_grad()
    def compact(self) -> None:
        """Drop the pruned triplets (λ = 0, or outside the final phase's pattern) from P, λ, Q and their
        state, so compute follows the kept rank; the output is unchanged (c keeps init_r, as the
        layer's scale; the regulariser then covers the kept triplets only). The parameters are new
        tensors: build (or rebuild) the optimiser after; config()'s rank follows."""
        keep = (self.lam != 0) & self.frozen_mask
        idx = keep.nonzero().view(-1)
        for f in self.factors:
            dim = ADALORA_TRIPLET_DIM[f]
            setattr(self, f, nn.Parameter(getattr(self, f).index_select(dim, idx)))
            for kind in ADALORA_EMAS:
                setattr(self, kind + f, getattr(self, kind + f).index_select(dim, idx))
        self.frozen_mask = self.frozen_mask[keep]
        self._options["rank"] = self.rank


class _Hadamard(torch.autograd.Function):
    """c (B1 T1 A1) ⊙ (B2 T2 A2) saving only the factors: the two weight-sized halves are rebuilt in
    the backward (a rank-r GEMM each) instead of kept, and without activation checkpointing's
    per-call cost. The backward is written in differentiable ops, so double backward works; the jvp
    (product rule, each half linear in each factor) and the generated vmap rule serve torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(c, B1, A1, B2, A2, T1, T2):
        return _half(B1 * c, T1, A1) * _half(B2, T2, A2)  # c on the small factor

    @staticmethod
    def setup_context(ctx, inputs, output):
        c, B1, A1, B2, A2, T1, T2 = inputs
        ctx.c_is_tensor = isinstance(c, Tensor)
        saved = (B1, A1, B2, A2, T1, T2, *([c] if ctx.c_is_tensor else []))
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.c = None if ctx.c_is_tensor else c

    @staticmethod
    def jvp(ctx, dc, dB1, dA1, dB2, dA2, dT1, dT2):
        B1, A1, B2, A2, T1, T2, *c = ctx.saved_tensors
        c = c[0] if ctx.c_is_tensor else ctx.c
        h1, h2 = _half(B1, T1, A1), _half(B2, T2, A2)
        d1, d2 = _half_jvp(B1, T1, A1, dB1, dT1, dA1), _half_jvp(B2, T2, A2, dB2, dT2, dA2)
        out = torch.zeros_like(h1)
        if d1 is not None:
            out = out + d1 * h2
        if d2 is not None:
            out = out + h1 * d2
        out = out * c
        return out + dc * (h1 * h2) if dc is not None else out

    @staticmethod
    def backward(ctx, g):
        B1, A1, B2, A2, T1, T2, *c = ctx.saved_tensors
        c = c[0] if ctx.c_is_tensor else ctx.c
        n = ctx.needs_input_grad
        h1, h2 = _half(B1, T1, A1), _half(B2, T2, A2)
        gh2 = g * h2
        d1 = _half_vjp(B1, T1, A1, gh2, (n[1], n[2], n[5]))
        d2 = _half_vjp(B2, T2, A2, g * h1, (n[3], n[4], n[6]))
        if ctx.c_is_tensor or c != 1:
            d1, d2 = ([None if d is None else d * c for d in ds] for ds in (d1, d2))
        (dB1, dA1, dT1), (dB2, dA2, dT2) = d1, d2
        dc = (gh2 * h1).sum().reshape(c.shape) if n[0] else None
        return dc, dB1, dA1, dB2, dA2, dT1, dT2


def _half(B: Tensor, T: Tensor | None, A: Tensor) -> Tensor:
    return B @ A if T is None else _tucker_rebuild(B, T, A)


def _half_jvp(B, T, A, dB, dT, dA) -> Tensor | None:
    """The tangent of h = _half(B, T, A) (linear in each factor), None when no factor has one."""
    terms = [_half(dB, T, A) if dB is not None else None, _half(B, T, dA) if dA is not None else None,
             _tucker_rebuild(B, dT, A) if dT is not None else None]
    terms = [t for t in terms if t is not None]
    return functools.reduce(torch.add, terms) if terms else None


def _half_vjp(B, T, A, dh, needs) -> tuple:
    """(dB, dA, dT) of h = _half(B, T, A) for the output gradient dh, None where `needs` (B, A, T) is false."""
    if T is None:
        return (dh @ A.mT if needs[0] else None), (B.mT @ dh if needs[1] else None), None
    return (torch.einsum("oihw,pqhw,qi->op", dh, T, A) if needs[0] else None,
            torch.einsum("op,pqhw,oihw->qi", B, T, dh) if needs[1] else None,
            torch.einsum("op,oihw,qi->pqhw", B, dh, A) if needs[2] else None)


def hadamard_delta(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor, T1: Tensor | None = None,
                   T2: Tensor | None = None, scale: float | Tensor = 1.0) -> Tensor:
    """LoHa's product of two low-rank halves, scale (B1 A1) ⊙ (B2 A2) with B_i (out, r), A_i (r, cols),
    or with Tucker cores T_i (r, r, kh, kw) and A_i (r, in): half_i[o, c, h, w] = Σ_{p,q} B_i[o, p]
    T_i[p, q, h, w] A_i[q, c]. scale: a number or a 0-dim tensor (then it gets a gradient too).
    Autograd keeps the factors only: the halves are rebuilt in the backward."""
    if (T1 is None) != (T2 is None):
        raise ValueError("hadamard_delta: give both Tucker cores or neither")
    return _Hadamard.apply(scale, B1, A1, B2, A2, T1, T2)


def _adapted_layer(adapter: Adapter, x: Tensor) -> Tensor:
    """The base layer run with W0 + ΔW (one Linear or one conv with the base's geometry)."""
    base = adapter.base
    W = base.weight + adapter.delta_weight()
    if adapter.is_conv:
        return F.conv2d(x, W, base.bias, *_conv_geometry(base))
    return F.linear(x, W, base.bias)


def hadamard_factors(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> tuple[Tensor, Tensor]:
    """(C, D) with C D = (B1 A1) ⊙ (B2 A2) exactly, for B_i (out, r_i) and A_i (r_i, cols): C (out, r1 r2)
    has rows C[o] = B1[o] ⊗ B2[o] (the face-splitting product), D (r1 r2, cols) columns D[:, i] =
    A1[:, i] ⊗ A2[:, i] (Khatri–Rao), since Σ_{p,q} B1[o,p] B2[o,q] A1[p,i] A2[q,i] = (B1 A1)[o,i] (B2 A2)[o,i].
    LoHa is a LoRA of rank r1 r2: (out + cols) r1 r2 values, differentiable by autograd."""
    C = (B1[:, :, None] * B2[:, None, :]).flatten(1)
    D = (A1[:, None, :] * A2[None, :, :]).flatten(0, 1)
    return C, D


def hadamard_factored(rows: int, m: int, n: int, rank: int, trains: bool) -> bool:
    """Whether LoHa (rank r, ΔW m x n; n = in·kh·kw on a conv) over `rows` rows (hadamard_rows) is cheaper
    added as the rank-r² product (x Dᵀ) Cᵀ (hadamard_factors; never a weight-sized tensor) than merged
    into W0 + ΔW.

    FLOPs beyond the frozen layer's: factored, 2·rows·r²·(m + n) forward and twice that backward (the
    gradients of C, D and x through them); merged, 4·r·m·n to build ΔW and, when it trains, the dense
    weight gradient 2·rows·m·n plus 12·r·m·n to rebuild the halves and run their four vjp GEMMs."""
    lowrank = 2 * rows * rank**2 * (m + n)
    if trains:
        return 3 * lowrank < 2 * rows * m * n + 16 * rank * m * n
    return lowrank < 4 * rank * m * n


def add_hadamard(base: nn.Linear | nn.Conv2d, x: Tensor, B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor, c,
                 y: Tensor | None = None, run=None) -> Tensor:
    """y + c x ((B1 A1) ⊙ (B2 A2))ᵀ over x's rows, as one pass of the rank-r² factors (hadamard_factors), c (a
    number or a 0-dim tensor) on C, where the update belongs to `base` (a Linear, or a conv of groups 1 whose
    A_i are (r, in·kh·kw): y + conv(x, c ΔW), LoCon of rank r², D's conv with base's geometry then C's 1x1
    up-projection). y None: base's own output, run(x) (default base(x)), on a Linear through lowrank_onto (one
    lora_linear op with base's weight where it can)."""
    C, D = hadamard_factors(B1 * c, A1, B2, A2)
    if isinstance(base, nn.Conv2d):
        D = D.view(D.shape[0], *base.weight.shape[1:])
        if y is None:
            return lowrank_conv_onto(base, x, D, C, run)
        return _add_up_projection(y, C, F.conv2d(x, D, None, *_conv_geometry(base)))
    ones = D.new_ones(D.shape[0])
    return lowrank_onto(base, x, D, ones, C, run) if y is None else add_lowrank(y, x, D, ones, C)


def hadamard_rows(layer: nn.Linear | nn.Conv2d, x: Tensor) -> int | None:
    """The rows a LoHa ΔW of `layer` meets in layer(x) (output pixels on a conv, (N, C, H, W) input), or
    None where it is not counted here (a grouped conv, or padding given as "same" / "valid"): the merged path."""
    if isinstance(layer, nn.Linear):
        return x.numel() // layer.in_features
    if layer.groups != 1 or x.dim() != 4 or isinstance(layer.padding, str):
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    H, W = x.shape[-2:]
    return x.shape[0] * ((H + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


class LoHa(Adapter):
    """ΔW = scale·(alpha/rank)·(B1 A1) ⊙ (B2 A2), all four (out, rank) / (rank, in) (LyCORIS's LoHa).

    B1 = 0 (identity start), A1 uniform(±1/sqrt(in)), B2 ~ N(0, 1), A2 ~ N(0, 1/rank) so B2 A2 has
    O(1) entries. ΔW = C D has rank r² (hadamard_factors): forward adds (x Dᵀ) Cᵀ to the base output
    (on a conv: D's conv, then C's 1x1) when that is the cheaper path (hadamard_factored: r² small
    beside the widths, as at rank 8 on SDXL's layers), else it builds W0 + ΔW and runs one Linear (or
    conv). Tucker convs and grouped convs always take W0 + ΔW.

    On an nn.Conv2d, W0 (out, in, kh, kw), as LyCORIS: A1, A2 are (rank, in·kh·kw) and ΔW is the
    product above reshaped to (out, in, kh, kw); or, tucker=True on a kernel larger than 1x1, each
    half is a Tucker product with a core T_i (rank, rank, kh, kw) and A_i (rank, in):
        ΔW[o, i] = scale·(alpha/rank)·(Σ B1[o, p] T1[p, q] A1[q, i]) ⊙ (Σ B2[o, p] T2[p, q] A2[q, i]).
    A kernel larger than 1x1 takes conv_rank / conv_alpha when given (LyCORIS's conv_dim /
    conv_alpha), else rank / alpha; a 1x1 conv counts as a Linear. dora=True: DoRA on that update
    (see `Adapter`).
    """

    method = "loha"
    bases = (nn.Linear, nn.Conv2d)

    def __init__(self, base: nn.Linear | nn.Conv2d, *, rank: int = 4, alpha: float | None = None,
                 conv_rank: int | None = None, conv_alpha: float | None = None, tucker: bool = False,
                 dora: bool = False, wd_on_out: bool = True, scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        m, n = W0.shape[:2]
        kernel = tuple(W0.shape[2:])
        rank, alpha, rank_name = _conv_options(W0, rank, alpha, conv_rank, conv_alpha, tucker)
        self.rank = _positive_int(rank_name, rank)
        self.alpha = float(rank if alpha is None else alpha)
        cols = n if tucker and _spatial(W0) else n * math.prod(kernel)
        self.B1 = nn.Parameter(W0.new_zeros(m, rank))
        self.A1 = nn.Parameter(_uniform(rank, cols, W0))
        self.B2 = nn.Parameter(torch.randn(m, rank, dtype=W0.dtype, device=W0.device))
        self.A2 = nn.Parameter(torch.randn(rank, cols, dtype=W0.dtype, device=W0.device) * rank**-0.5)
        tucker = tucker and _spatial(W0)
        for name in ("T1", "T2"):
            core = _uniform(rank, rank * math.prod(kernel), W0).view(rank, rank, *kernel) if tucker else None
            self.register_parameter(name, None if core is None else nn.Parameter(core))
        self._options = {"rank": rank, "alpha": self.alpha}
        if self.is_conv:
            self._options["tucker"] = tucker
        self._init_dora(dora, wd_on_out)

    def _forward(self, x):
        rows = hadamard_rows(self.base, x) if self.T1 is None else None
        if rows is not None:
            m, n = self.B1.shape[0], self.A1.shape[1]
            trains = torch.is_grad_enabled() and any(p.requires_grad for p in (self.B1, self.A1, self.B2, self.A2))
            if hadamard_factored(rows, m, n, self.rank, trains):
                c = self.scale * self.alpha / self.rank
                return add_hadamard(self.base, x, self.B1, self.A1, self.B2, self.A2, c)
        return _adapted_layer(self, x)

    def _delta(self, scale):
        c = scale * self.alpha / self.rank
        delta = hadamard_delta(self.B1, self.A1, self.B2, self.A2, self.T1, self.T2, c)
        return delta.reshape(self.base.weight.shape)


class _BaddbmmInto(torch.autograd.Function):
    """y += a @ b (batched, a (B, i, k), b (B, k, j), y holding B·i·j values), written into y itself:
    baddbmm would copy y into a fresh output first, and in-place on a view of y makes autograd clone
    the whole gradient (CopySlices). For a y that nothing else holds (see _plain_linear)."""

    @staticmethod
    def forward(ctx, y, a, b):
        ctx.save_for_backward(a, b)
        y.view(a.shape[0], a.shape[1], b.shape[2]).baddbmm_(a, b)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g3 = g.reshape(a.shape[0], a.shape[1], b.shape[2])
        return (g, torch.bmm(g3, b.mT) if ctx.needs_input_grad[1] else None,
                torch.bmm(a.mT, g3) if ctx.needs_input_grad[2] else None)


def _add_kron_linear(y: Tensor, x: Tensor, W1: Tensor, W2: tuple, into: bool = False) -> Tensor:
    """y + x (W1 ⊗ W2)^T, W1 (m1, n1), W2 as (W2,) dense (m2, n2) or (B2, A2) of rank r, over x's last dim as
    (n1, n2); into=True: into y itself (_BaddbmmInto; y contiguous and held by nothing else, see _plain_linear).

    Multiply-adds per row: W2 first n1·n2·m2 + m1·n1·m2, W1 first m1·n1·n2 + m1·n2·m2 (W2 dense, or B2 A2 formed),
    and through the rank n1·n2·r + m1·n1·r + m1·r·m2: A2 on each of the n1 groups, W1 across the groups' r
    values (one GEMM), B2 onto y (one GEMM over rows·m1). The cheapest order runs, all plain GEMMs over views with
    no output-sized temporary (on the CPU several times faster than kron_matmul's two-factor kernel). Through the
    rank, against W2 first, 2048 rows, rank 8, fp32, same process: 640->5120 first layer 1.39 -> 1.30 of the
    frozen step, in-network 1.38 -> 1.26; 1280->1280 in-network 1.29 -> 1.21."""
    m1, n1 = W1.shape
    if len(W2) == 2:
        B2, A2 = W2
        (m2, r), n2 = B2.shape, A2.shape[1]
    else:
        (m2, n2), r = W2[0].shape, None
    M = x.numel() // (n1 * n2)
    cost = {"W2": n1 * n2 * m2 + m1 * n1 * m2, "W1": m1 * n1 * n2 + m1 * n2 * m2}
    if r is not None:
        cost["rank"] = n1 * n2 * r + m1 * n1 * r + m1 * r * m2
    order = min(cost, key=cost.get)
    if order == "rank":
        u = (x.reshape(M * n1, n2) @ A2.mT).view(M, n1, r)
        v = (W1 @ u.transpose(0, 1).reshape(n1, M * r)).view(m1, M, r)
        a, b = v.transpose(0, 1).reshape(1, M * m1, r), B2.mT[None]
    else:
        dense = _kron_w2(W2)
        if order == "W2":
            a, b = W1.expand(M, m1, n1), (x.reshape(M * n1, n2) @ dense.mT).view(M, n1, m2)
        else:
            a, b = torch.bmm(W1.expand(M, m1, n1), x.reshape(M, n1, n2)).view(1, M * m1, n2), dense.mT[None]
    if into and y.is_contiguous():
        # F.linear's output for a 3-D x is a view of its 2-D GEMM output; written in place as a view, autograd
        # would clone the whole gradient (CopySlices: ff 640->5120 at 2x1024 tokens, 93 ms a step instead of 60)
        whole = y if y._base is None or y._base.numel() != y.numel() or not y._base.is_contiguous() else y._base
        return _BaddbmmInto.apply(whole, a, b).view(y.shape)
    return torch.baddbmm(y.reshape(a.shape[0], a.shape[1], b.shape[2]), a, b).view(y.shape)


def _kron_conv_factored(conv: nn.Conv2d, m1: int, n1: int, rank: int | None, tucker: bool) -> bool:
    """Whether a training step of conv + LoKr ΔW = W1 ⊗ W2 (W1 (m1, n1); W2 dense when rank is None,
    else B2 A2 of that rank, with a Tucker core when tucker) is cheaper factored (_add_kron_conv) than
    with the merged weight W0 + ΔW.

    Forward FLOPs per output pixel:
      base / merged conv  F0 = 2·m·n·k²             (k² = kh·kw)
      factored delta      f  = n1·c2 + 2·m1·n1·m2   (c2: W2's conv over one channel group,
                               2·m2·n2·k² dense, 2·r·(n2·k² + m2) as B2 A2, and with the Tucker core
                               2·r·(n2·s + r·k² + m2), its 1x1 A2 on s = stride_h·stride_w input
                               pixels per output pixel; then W1 mixes the n1 groups)
    Merged, a step is the conv, its input gradient and a dense weight gradient (F0 more than the
    frozen layer); factored, the base conv and its input gradient plus the delta's forward and
    backward (~3f). So factored iff 3f < F0 (callers ask only when the adapter trains: without a
    gradient the merged conv, F0 against F0 + f, is cheaper). Grouped convs are never factored."""
    m, n, kh, kw = conv.weight.shape
    if conv.groups != 1:
        return False
    k2 = kh * kw
    m2, n2 = m // m1, n // n1
    if rank is None:
        c2 = 2 * m2 * n2 * k2
    elif tucker:
        c2 = 2 * rank * (n2 * math.prod(conv.stride) + rank * k2 + m2)
    else:
        c2 = 2 * rank * (n2 * k2 + m2)
    f = n1 * c2 + 2.0 * m1 * n1 * m2
    return 3.0 * f < 2.0 * m * n * k2


def _add_kron_conv(y: Tensor, x: Tensor, W1: Tensor, W2: tuple, conv: nn.Conv2d) -> Tensor:
    """y + conv(x, W1 ⊗ W2) with conv's geometry, ΔW never formed. W1 (m1, n1) carries every scale; W2 is
    (W2,) dense (m2, n2, kh, kw), (B2, A2) with A2 (r, n2·kh·kw), or (B2, T2, A2) with a Tucker core T2
    (r, r, kh, kw) and A2 (r, n2). ΔW[(a, b), (p, q)] = W1[a, p] W2[b, q], so input channel group p
    (channels p·n2 .. p·n2 + n2 - 1) is convolved with W2 as one more batch entry, and W1 then mixes
    the n1 groups' outputs into the m1 output groups. y: conv(x) (N, m, H', W'), x a 4-D batch."""
    geometry = _conv_geometry(conv)
    m1, n1 = W1.shape
    N, _, H, W = x.shape
    h = x.reshape(N * n1, -1, H, W)
    if len(W2) == 1:
        h = F.conv2d(h, W2[0], None, *geometry)
    elif len(W2) == 2:
        B2, A2 = W2
        h = F.conv2d(h, A2.reshape(A2.shape[0], -1, *conv.weight.shape[2:]), None, *geometry)
    else:  # zero padding commutes with the bias-free 1x1 A2, so the core alone pads
        B2, T2, A2 = W2
        h = F.conv2d(F.conv2d(h, A2[:, :, None, None]), T2, None, *geometry)
    if len(W2) > 1:
        r, m2 = B2.shape[1], B2.shape[0]
        if m1 * r * (n1 + m2) < n1 * m2 * (r + m1):
            # W1 mixes the groups' r channels first (per output pixel m1·n1·r + m1·m2·r multiply-adds, not
            # n1·m2·r + m1·n1·m2, and no (N·n1, m2, ...) intermediate), then B2 goes onto y viewed
            # (N·m1, m2, H'·W') as one batched GEMM
            v = torch.bmm(W1.expand(N, m1, n1), h.reshape(N, n1, -1))
            y3 = y.reshape(N * m1, m2, -1)
            return torch.baddbmm(y3, B2.expand(N * m1, -1, -1), v.view(N * m1, r, -1)).view(y.shape)
        # B2 as a GEMM per group: a 1x1 conv from `rank` channels runs far slower
        h = torch.bmm(B2.expand(h.shape[0], -1, -1), h.flatten(2))
    # y viewed (N, m1, m2·H'·W') (channel a·m2 + b, as ΔW orders them) plus W1 @ h, h (N, n1, m2·H'·W'):
    # one batched GEMM onto y (matmul's broadcast would transpose h into one tall GEMM, and a separate
    # add would need an output-sized temporary)
    return torch.baddbmm(y.reshape(N, m1, -1), W1.expand(N, m1, n1), h.reshape(N, n1, -1)).view(y.shape)


def _kron_w2(W2: tuple, kernel: Sequence[int] = ()) -> Tensor:
    """LoKr's W2 formed from the factored forms _add_kron_linear and _add_kron_conv take: (W2,) dense, (B2, A2) (the
    product viewed (m2, n2, *kernel): (m2, n2) on a Linear; kernel () on a conv keeps (m2, n2·kh·kw)), or
    (B2, T2, A2) with a Tucker core (m2, n2, kh, kw)."""
    if len(W2) == 1:
        return W2[0]
    if len(W2) == 2:
        return (W2[0] @ W2[1]).view(W2[0].shape[0], -1, *kernel)
    return _tucker_rebuild(*W2)


def kron_conv_onto(conv: nn.Conv2d, x: Tensor, W1: Tensor, W2: tuple, run=None) -> Tensor:
    """run(x) (default conv(x)) + conv(x, W1 ⊗ W2), the update factored (_add_kron_conv, _conv_update)."""
    kernel = conv.weight.shape[2:]
    return _conv_update(conv, x, run, lambda y, x, W1, *W2: _add_kron_conv(y, x, W1, W2, conv),
                        lambda W1, *W2: torch.kron(W1[:, :, None, None], _kron_w2(W2, kernel).contiguous()), W1, *W2)


class LoKr(Adapter):
    """ΔW = scale·c·W1 ⊗ W2, W1 (m1, n1), W2 (m2, n2), m1·m2 = out, n1·n2 = in (LyCORIS's LoKr).

    factor: m1 = n1 = factor, or an (m1, n1) pair; default the smaller of the balanced two-factor
    splits of out and of in (specops.kron_factor_sizes; a prime width splits as 1 x width), which is
    LyCORIS's factorization(dim, -1).
    rank: W2 = B2 A2 with B2 (m2, rank), A2 (rank, n2); None keeps W2 dense (uniform init).
    w1_rank: W1 = B1 A1 with B1 (m1, w1_rank) = 0, A1 (w1_rank, n1); None keeps W1 dense (= 0).
    alpha and c follow LyCORIS: with both factors dense c = 1 and alpha must be None; otherwise
    c = alpha / r, r = w1_rank if W1 is factored, else rank, and alpha defaults to r (c = 1).
    Forward: base(x) + x (scale·c·W1 ⊗ W2)^T as GEMMs over x viewed (rows, n1, n2) in the cheapest order, a
    low-rank W2 through its rank (_add_kron_linear); ΔW is never formed.

    On an nn.Conv2d, W0 (out, in, kh, kw), as LyCORIS: the Kronecker product is over the channels
    and the kernel lies on the second factor, ΔW[(a, b), (p, q), h, w] = scale·c·W1[a, p] W2[b, q, h, w]:
    W2 dense (m2, n2, kh, kw), or B2 (m2, rank) A2 (rank, n2·kh·kw) reshaped, or with tucker=True on
    a kernel larger than 1x1 B2 (m2, rank), a core T2 (rank, rank, kh, kw), A2 (rank, n2):
    W2[b, q, h, w] = Σ_{p,s} B2[b, p] T2[p, s, h, w] A2[s, q].
    conv_rank / conv_alpha act on kernels larger than 1x1 (as LoRA). Forward on a conv, when the
    adapter trains and the FLOPs favour it (_kron_conv_factored): base(x) + conv(x, ΔW) with ΔW never
    formed (W2's convolution per channel group, then W1 across groups), which needs no dense weight
    gradient; otherwise one conv with W0 + ΔW. dora=True: DoRA on that update (see `Adapter`).
    """

    method = "lokr"
    bases = (nn.Linear, nn.Conv2d)

    def __init__(self, base: nn.Linear | nn.Conv2d, *, factor=None, rank: int | None = None,
                 w1_rank: int | None = None, alpha: float | None = None, conv_rank: int | None = None,
                 conv_alpha: float | None = None, tucker: bool = False, dora: bool = False, wd_on_out: bool = True,
                 scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        m, n = W0.shape[:2]
        kernel = tuple(W0.shape[2:])
        rank, alpha, rank_name = _conv_options(W0, rank, alpha, conv_rank, conv_alpha, tucker)
        if factor is None:
            m1, n1 = kron_factor_sizes(m, 2, allow_ones=True)[0], kron_factor_sizes(n, 2, allow_ones=True)[0]
        elif isinstance(factor, int):
            m1 = n1 = _positive_int("factor", factor)
        elif isinstance(factor, Sequence) and len(factor) == 2:
            m1, n1 = (_positive_int("factor", f) for f in factor)
        else:
            raise ValueError(f"factor: expected None, an int or an (m1, n1) pair, got {factor!r}")
        what = "channels" if self.is_conv else "features"
        if m % m1 or n % n1:
            raise ValueError(
                f"factor: expected m1 dividing out_{what}={m} and n1 dividing in_{what}={n}, "
                f"got (m1, n1) = ({m1}, {n1})"
            )
        m2, n2 = m // m1, n // n1
        if w1_rank is None:
            self.W1 = nn.Parameter(W0.new_zeros(m1, n1))
        else:
            w1_rank = _positive_int("w1_rank", w1_rank)
            self.B1 = nn.Parameter(W0.new_zeros(m1, w1_rank))
            self.A1 = nn.Parameter(_uniform(w1_rank, n1, W0))
        tucker = tucker and _spatial(W0) and rank is not None
        self.register_parameter("T2", None)
        if rank is None:
            self.W2 = nn.Parameter(_uniform(m2, n2 * math.prod(kernel), W0).view(m2, n2, *kernel))
        else:
            rank = _positive_int(rank_name, rank)
            self.B2 = nn.Parameter(_uniform(m2, rank, W0))
            self.A2 = nn.Parameter(_uniform(rank, n2 if tucker else n2 * math.prod(kernel), W0))
            if tucker:
                self.T2 = nn.Parameter(_uniform(rank, rank * math.prod(kernel), W0).view(rank, rank, *kernel))
        r = w1_rank if w1_rank is not None else rank
        if r is None and alpha is not None:
            raise ValueError(f"alpha: {alpha!r}, but with both Kronecker factors dense LoKr has no alpha "
                             "(LyCORIS's scale is 1 there); give rank or w1_rank")
        self.rank, self.w1_rank = rank, w1_rank
        self.alpha = None if r is None else float(r if alpha is None else alpha)
        self._coef = 1.0 if r is None else self.alpha / r
        self._options = {"factor": [m1, n1], "rank": rank, "w1_rank": w1_rank, "alpha": self.alpha}
        if self.is_conv:
            self._options["tucker"] = tucker
        self._init_dora(dora, wd_on_out)

    def kron_factors(self, scale: float | None = None) -> tuple[Tensor, Tensor]:
        """(W1 with every scale folded in, W2): without DoRA delta_weight() == kron(W1, W2), on a conv
        torch.kron(W1[:, :, None, None], W2) with W2 (m2, n2, kh, kw). scale: None means self.scale."""
        return self._w1(scale), _kron_w2(self._w2_parts(), self.base.weight.shape[2:])

    def _w1(self, scale: float | None = None) -> Tensor:
        """W1 with every scale folded in (scale: None means self.scale)."""
        W1 = self.W1 if self.w1_rank is None else self.B1 @ self.A1
        return W1 * ((self.scale if scale is None else scale) * self._coef)

    def _w2_parts(self) -> tuple:
        """W2 as _add_kron_linear / _add_kron_conv take it: (W2,), (B2, A2) or (B2, T2, A2)."""
        if self.rank is None:
            return (self.W2,)
        return (self.B2, self.A2) if self.T2 is None else (self.B2, self.T2, self.A2)

    def _forward(self, x):
        if not self.is_conv:
            W1 = self._w1()
            # (into the base's output only in plain eager calls: torch.func cannot run _BaddbmmInto)
            into = _plain_linear(self.base, x, W1) and _registry._eager()
            return _add_kron_linear(self.base(x), x, W1, self._w2_parts(), into=into)
        if x.dim() == 4 and self._conv_factored():  # a batch; an unbatched input takes the merged conv
            return self._conv_forward_factored(x)
        return _adapted_layer(self, x)

    def _conv_factored(self) -> bool:
        """Whether this training step applies ΔW factored (_add_kron_conv) rather than merged."""
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters(recurse=False)):
            return False
        m1, n1 = self.W1.shape if self.w1_rank is None else (self.B1.shape[0], self.A1.shape[1])
        return _kron_conv_factored(self.base, m1, n1, self.rank, self.T2 is not None)

    def _conv_forward_factored(self, x: Tensor) -> Tensor:
        return kron_conv_onto(self.base, x, self._w1(), self._w2_parts())

    def _delta(self, scale):
        W1, W2 = self.kron_factors(scale)
        if self.is_conv:
            return torch.kron(W1[:, :, None, None], W2.contiguous())
        return kron([W1, W2])


class ZipLoRA(Adapter):
    """ZipLoRA: ΔW = scale·(s_c B_c A_c diag(m_c) + s_s B_s A_s diag(m_s)), mergers m_c, m_s (in,).

    content, style: (B, A) or (B, A, s) tuples, B (out, r), A (r, in), cast to the base dtype and
    frozen (non-persistent buffers: they are inputs, so config() cannot carry them — rebuild with
    make_adapter("ziplora", base, content=..., style=..., **config())). init: every merger entry;
    the default 1.0 starts from the plain sum of both LoRAs, init=0.0 from the identity.
    Forward: specops.zip_lora_linear. lora_factors(): the exact merged LoRA of rank r_c + r_s
    (specops.zip_merge_lora; the scales are folded into A).
    """

    method = "ziplora"

    def __init__(self, base: nn.Linear, content, style, *, init: float = 1.0, scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        B_c, A_c, self.scale_c = _lora_parts(content, "content")
        B_s, A_s, self.scale_s = _lora_parts(style, "style")
        B_c, A_c, B_s, A_s = (t.to(W0) for t in (B_c, A_c, B_s, A_s))
        ones = torch.full((W0.shape[1],), float(init), dtype=W0.dtype, device=W0.device)
        _check_linear(W0[:1], W0, base.bias, B_c, A_c, ones, B_s, A_s, ones)
        for name, t in (("B_c", B_c), ("A_c", A_c), ("B_s", B_s), ("A_s", A_s)):
            self.register_buffer(name, t, persistent=False)
        self.m_c = nn.Parameter(ones.clone())
        self.m_s = nn.Parameter(ones)
        self._options = {"init": float(init)}

    def _forward(self, x):
        return zip_lora_linear(x, self.base.weight, self.base.bias, self.B_c, self.A_c, self.m_c, self.B_s,
                               self.A_s, self.m_s, self.scale * self.scale_c, self.scale * self.scale_s)

    def lora_factors(self):
        """([B_c | B_s], [scale·s_c·A_c diag(m_c); scale·s_s·A_s diag(m_s)])."""
        return zip_merge_lora(self.B_c, self.A_c, self.B_s, self.A_s, self.m_c, self.m_s,
                              self.scale * self.scale_c, self.scale * self.scale_s)

    def delta_weight(self):
        B, A = self.lora_factors()
        return B @ A


# ----------------------------------------------------------------------------- rebuild methods


class _Rebuild(Adapter):
    """Methods that give the adapted weight W: ΔW = scale·(W - W0).

    On an nn.Conv2d they see the kernel as the matrix W0 (out, in·kh·kw) (F.unfold's column order):
    `cols` is in_features or in_channels·kh·kw, and the conv runs with W reshaped back."""

    bases = (nn.Linear, nn.Conv2d)

    def __init__(self, base: nn.Linear | nn.Conv2d, *, scale: float):
        super().__init__(base, scale=scale)
        self.cols = base.weight[0].numel()
        self._cols_name = "in_channels·kh·kw" if self.is_conv else "in_features"
        self._rows_name = "out_channels" if self.is_conv else "out_features"

    def _w0_matrix(self) -> Tensor:
        """W0 as an (out, cols) matrix (a view of the conv kernel)."""
        return self._w0().flatten(1)

    def adapted_weight(self) -> Tensor:
        """The adapted weight W (out, in) — on a conv the (out, in·kh·kw) matrix — in the adapter's
        compute dtype; differentiable."""
        raise NotImplementedError

    def delta_weight(self):
        W, W0 = self.adapted_weight(), self._w0()
        return (self.scale * (W - W0.flatten(1).to(W.dtype))).to(W0.dtype).view(W0.shape)

    def _dense_forward(self, x: Tensor) -> Tensor:
        """One Linear or conv (the base's geometry) with W, in W's compute dtype; at scale s with
        W0 + s (W - W0), which is base(x) + s (x W^T - x W0^T) since the layer is affine in its weight."""
        base = self.base
        W = self.adapted_weight()
        if self.scale != 1.0:
            W = torch.lerp(base.weight.flatten(1).to(W.dtype), W, self.scale)
        bias = None if base.bias is None else base.bias.to(W.dtype)
        if self.is_conv:
            y = F.conv2d(x.to(W.dtype), W.view(base.weight.shape), bias, *_conv_geometry(base))
        else:
            y = F.linear(x.to(W.dtype), W, bias)
        return y.to(x.dtype)


def _trains_linear(adapter) -> bool:
    """A Linear rotation adapter whose rotation trains now: then rotating activations (rows · d · b FLOPs)
    beats building W, whose backward is a dense weight-gradient GEMM."""
    return not adapter.is_conv and torch.is_grad_enabled() and adapter.Q.requires_grad


def _rotated_output(adapter, x: Tensor, rotate) -> Tensor:
    """diag(g) R (W0 x) + b for an output-side rotation, rotate(t) = t R^T over t's features: rotate(y0) ⊙ g +
    (b - g ⊙ R b) for y0 = base(x) (the rotation one pass, the bias term one in-place add); at scale s, lerp
    from y0. The backward needs no dense weight gradient. While R = I and g = 1 it returns base(x) bit for bit."""
    base, cd = adapter.base, adapter._cd
    y0 = base(x).to(cd)
    y = rotate(y0)
    g = None if adapter.g is None else adapter.g.to(cd)
    if g is not None:
        y = y * g
    if base.bias is not None:
        b = base.bias.to(cd)
        Rb = rotate(b[None])[0]
        y = y.add_(b - (Rb if g is None else g * Rb))
    if adapter.scale != 1.0:
        y = torch.lerp(y0, y, adapter.scale)
    return y.to(x.dtype)


class _Rotation(_Rebuild):
    """W = W0 R over the input side. On a Linear y = base(x R^T); at scale s, base(x + s (x R^T - x)),
    which equals base(x) + s (x W^T - x W0^T) because base is affine: still one Linear. A conv
    cannot rotate its unfolded input cheaply, so there forward builds W and runs one conv."""

    _cd: torch.dtype  # compute dtype of the rotation

    def _rotate(self, t: Tensor, transpose: bool) -> Tensor:
        """t R^T if transpose else t R, over the last dim of t (length cols)."""
        raise NotImplementedError

    def _forward(self, x):
        if self.is_conv:
            return self._dense_forward(x)
        xc = x.to(self._cd)
        xr = self._rotate(xc, transpose=True)
        if self.scale != 1.0:
            xr = torch.lerp(xc, xr, self.scale)
        return self.base(xr.to(x.dtype))

    def adapted_weight(self):
        return self._rotate(self._w0_matrix().to(self._cd), transpose=False)


OFT_SIDES = ("input", "output")


class OFT(_Rotation):
    """Block-diagonal orthogonal fine-tuning, R = diag(R_1, ..., R_b), R_i = cayley(S_i) =
    (I - S_i/2)^-1 (I + S_i/2), S_i = Q_i - Q_i^T:

        side "input"  (default):  W = diag(g) W0 R,  R over the n = in (conv: in·kh·kw) columns
        side "output":            W = diag(g) R W0,  R over the m = out rows (LyCORIS's diag-oft)

    Q (blocks, d/blocks, d/blocks) is unconstrained and zero-initialised (R = I), d the rotated
    dimension; any Q gives an orthogonal R, so Q trains with a Euclidean optimiser.
    rescale: False keeps g = 1; True makes g (m,) a trainable per-output scale, initialised to 1
        (LyCORIS's rescaled=True).
    constraint κ >= 0 (LyCORIS's constraint): κ > 0 shrinks all blocks together so that
        ||S||_F / 2 <= κ d: S <- S · κd / max(||S||_F / 2, κd) (LyCORIS divides by that norm plus
        1e-8: a relative difference below 1e-8 / (κd)). 0 leaves S as it is.
    Forward: a Linear input side without rescale rotates x (specops.kron.block_diag_matmul, block i times
    R_i^T) and runs base; a Linear output side while Q trains runs base's GEMM and rotates its output's
    features (no dense weight gradient in the backward); otherwise (inference on the output side,
    rescale on the input side, a conv) it builds W and runs one Linear or conv.

    LyCORIS's diag-oft file (oft_blocks B, rescale, alpha = κ) is side "output" with Q = -2 B:
    its R_ly = (I + q)(I - q)^-1, q = B - B^T, acts as W_ly = diag(g) R_ly^T W0, and R_ly^T =
    cayley(-2q). At multiplier s ≠ 1 LyCORIS's ΔW is diag(g) (W0 + s (R W0 - W0)) - W0 (this R);
    specops's scale gives s (W - W0), the same when g = 1.
    """

    method = "oft"

    def __init__(self, base: nn.Linear | nn.Conv2d, *, blocks: int = 4, side: str = "input", rescale: bool = False,
                 constraint: float = 0.0, scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        self.side = _choice("side", side, OFT_SIDES)
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale: expected a bool, got {rescale!r}")
        if isinstance(constraint, bool) or not isinstance(constraint, (int, float)) or not constraint >= 0:
            raise ValueError(f"constraint: expected a number >= 0, got {constraint!r}")
        blocks = _positive_int("blocks", blocks)
        if side == "output":
            d, what = self.out_features, f"{self._rows_name}={self.out_features}"
        elif self.is_conv:
            d, what = self.cols, f"{self._cols_name} = {self.cols}"
        else:
            d, what = self.cols, f"{self._cols_name}={self.cols}"
        if d % blocks:
            raise ValueError(f"blocks: expected a divisor of {what}, got {blocks}")
        self.Q = nn.Parameter(W0.new_zeros(blocks, d // blocks, d // blocks))
        g = torch.ones(self.out_features, dtype=acc_dtype(W0.dtype), device=W0.device)
        self.register_parameter("g", nn.Parameter(g) if rescale else None)
        self.constraint = float(constraint)
        self._options = {"blocks": blocks, "side": side, "rescale": rescale, "constraint": self.constraint}

    @property
    def _cd(self):
        return acc_dtype(self.Q.dtype)

    def rotation_blocks(self) -> Tensor:
        """(blocks, p, p): the orthogonal blocks R_i, in the compute dtype."""
        S = (self.Q - self.Q.mT).to(self._cd)
        if self.constraint > 0:
            bound = self.constraint * self.Q.shape[0] * self.Q.shape[1]
            S = S * (bound / torch.maximum(torch.linalg.vector_norm(S) / 2, S.new_tensor(bound)))
        return cayley(S)

    def _rotate(self, t, transpose):
        R = self.rotation_blocks()
        return block_diag_matmul(t, R.mT if transpose else R)

    def _forward(self, x):
        if self.side == "input" and self.g is None:
            return super()._forward(x)
        if self.side == "output" and _trains_linear(self):
            return self._output_rotated(x)
        return self._dense_forward(x)

    def _output_rotated(self, x):
        Rt = self.rotation_blocks().mT
        return _rotated_output(self, x, lambda t: block_diag_matmul(t, Rt))

    def adapted_weight(self):
        W0 = self._w0_matrix().to(self._cd)
        if self.side == "input":
            W = self._rotate(W0, transpose=False)
        else:
            R = self.rotation_blocks()
            W = torch.einsum("bij,bjc->bic", R, W0.unflatten(0, R.shape[:2])).flatten(0, 1)
        return W if self.g is None else self.g[:, None].to(self._cd) * W


class _Permute(torch.autograd.Function):
    """t.index_select(0, idx) for a permutation idx with inverse inv. Its backward is the inverse gather
    (index_select's own backward scatters with index_add, several times slower on the CPU)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t, idx, inv):
        return t.index_select(0, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.idx, ctx.inv = inputs[1], inputs[2]  # integer constants: nothing to version-check

    @staticmethod
    def backward(ctx, grad):
        return _Permute.apply(grad, ctx.inv, ctx.idx), None, None

    @staticmethod
    def jvp(ctx, tangent, _idx, _inv):
        return _Permute.apply(tangent, ctx.idx, ctx.inv)


def _permute_rows(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else _Permute.apply(t, idx, torch.argsort(idx))


def butterfly(t: Tensor, blocks: Tensor, gathers: Sequence[Tensor | None]) -> Tensor:
    """B_{m-1} ⋯ B_1 B_0 t over t's first dim (t (n, ...), n = D b), never forming an n x n matrix:

        B_i = Π_i^T diag(blocks[i, 0], ..., blocks[i, D-1]) Π_i,

    blocks (m, D, b, b), Π_i the row gather t -> t[gathers[i]] (a permutation of range(n), on t's
    device; None for the identity). Between stages the scatter of one and the gather of the next are
    one gather (Π_{i+1} Π_i^T), so t is moved m + 1 times, and each move's backward is the inverse
    gather. Stage i costs 2 n b · t[0].numel() FLOPs."""
    m, D, b, _ = blocks.shape
    n, shape = t.shape[0], t.shape
    u, back = t.reshape(n, -1), None  # back: Π_{i-1}^T as a gather (None: the identity)
    for i in range(m):
        g = gathers[i]
        u = _permute_rows(u, g if back is None else (back if g is None else back[g]))
        u = torch.matmul(blocks[i], u.view(D, b, -1)).view(n, -1)
        back = None if g is None else torch.argsort(g)
    return _permute_rows(u, back).view(shape)


# Butterfly rotations of at most this many stages train on activations (butterfly_rows), deeper ones on W0:
# each stage's pass gathers and scatters every row of the activations, so by 3-4 stages they cost more than
# the dense weight gradient they spare (1280 wide, 2x1024 tokens, fp32, one in-network step: 1 stage 114 ms on
# activations vs 152 ms on W0; 8 stages 234 vs 178 ms).
BUTTERFLY_ROWS_MAX_STAGES = 2


def butterfly_rows(t: Tensor, blocks: Tensor, gathers: Sequence[Tensor | None]) -> Tensor:
    """t R^T over t's last dim for butterfly's R = B_{m-1} ⋯ B_0 (the same blocks and gathers):
    t B_0^T ⋯ B_{m-1}^T, each stage one block_diag_matmul pass with the stage's gather as its perm
    (gather, blocks and scatter in one pass over t's rows)."""
    for i in range(blocks.shape[0]):
        t = block_diag_matmul(t, blocks[i].mT, gathers[i])
    return t


def butterfly_gathers(n: int, block_size: int, stages: int, device=None) -> list[Tensor]:
    """The butterfly gathers of BOFT: stage i splits range(n) into segments of 2^i b and lists each
    segment as the pairs (e, e + 2^{i-1} b), e < 2^{i-1} b, side by side, so a block of b mixes b/2
    offsets of one half with the same offsets of the other (stage 0: within each block of b, its two
    halves interleaved). Needs b even and 2^{stages-1} b dividing n. LyCORIS's BOFT stages."""
    out = []
    for i in range(stages):
        k = 2 ** i * block_size // 2
        out.append(torch.arange(n, device=device).view(-1, 2, k).transpose(1, 2).reshape(-1))
    return out


def boft_max_stages(n: int, block_size: int) -> int:
    """The most butterfly stages a rotated dim n takes with blocks of block_size: the largest m with
    2^{m-1} b | n (b even), LyCORIS's BOFT depth when n / b is a power of two."""
    m = 0
    while block_size % 2 == 0 and n % (2 ** m * block_size) == 0:
        m += 1
    return m


class BOFT(_Rebuild):
    """Butterfly orthogonal fine-tuning: R = B_{m-1} ⋯ B_0 (specops.adapters.butterfly), each stage B_i
    block-diagonal with D = d / b orthogonal blocks R_ij = cayley(Q_ij - Q_ij^T) between the butterfly
    permutations Π_i of butterfly_gathers, so m = log2(d / b) + 1 stages of b x b blocks reach a dense
    orthogonal R with m d b parameters:

        side "input"  (default):  W = diag(g) W0 R,  R over the d = in (conv: in·kh·kw) columns
        side "output":            W = diag(g) R W0,  R over the d = out rows (LyCORIS's BOFT)

    block_size b (even) and stages m (default the most, boft_max_stages: 2^{m-1} b must divide d);
    one stage is block-diagonal OFT with its blocks' halves interleaved. Q (m, D, b, b) is zero-initialised
    (R = I) and unconstrained. rescale and constraint κ as OFT's (κ > 0: ||S||_F / 2 <= κ d over all
    stages' S = Q - Q^T together).
    Forward: a Linear while Q trains, with at most BUTTERFLY_ROWS_MAX_STAGES stages, rotates activations
    stage by stage (butterfly_rows: one block_diag_matmul pass each), so the backward has no dense weight
    gradient: the base output on
    the output side, x on the input side when x requires grad and there is no rescale (without an input
    gradient, x's rotation would need the base's input gradient, a GEMM as dense). Otherwise W is built
    stage by stage on W0 (2 m d b · W0.numel() / d FLOPs; never a d x d matrix) and runs one Linear or conv.

    LyCORIS's BOFT file (oft_blocks B (m, D, b, b), rescale, alpha = κ) is side "output" with Q = 2 B:
    its stage blocks (I + q)(I - q)^-1, q = B - B^T, are cayley(2 q); its stages are Π_i's.
    """

    method = "boft"

    def __init__(self, base: nn.Linear | nn.Conv2d, *, block_size: int = 8, stages: int | None = None,
                 side: str = "input", rescale: bool = False, constraint: float = 0.0, scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        self.side = _choice("side", side, OFT_SIDES)
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale: expected a bool, got {rescale!r}")
        if isinstance(constraint, bool) or not isinstance(constraint, (int, float)) or not constraint >= 0:
            raise ValueError(f"constraint: expected a number >= 0, got {constraint!r}")
        b = _positive_int("block_size", block_size)
        d, name = (self.out_features, self._rows_name) if side == "output" else (self.cols, self._cols_name)
        if b % 2 or d % b:
            raise ValueError(f"block_size: expected an even divisor of {name} = {d}, got {b}")
        most = boft_max_stages(d, b)
        m = most if stages is None else _positive_int("stages", stages)
        if m > most:
            raise ValueError(f"stages: {name} = {d} with blocks of {b} takes at most {most} stages "
                             f"(2^(stages-1)·block_size must divide it), got {m}")
        self.Q = nn.Parameter(W0.new_zeros(m, d // b, b, b))
        g = torch.ones(self.out_features, dtype=acc_dtype(W0.dtype), device=W0.device)
        self.register_parameter("g", nn.Parameter(g) if rescale else None)
        self.constraint = float(constraint)
        self._options = {"block_size": b, "stages": m, "side": side, "rescale": rescale,
                         "constraint": self.constraint}

    @property
    def _cd(self):
        return acc_dtype(self.Q.dtype)

    def rotation_blocks(self) -> Tensor:
        """(m, D, b, b): every stage's orthogonal blocks, in the compute dtype."""
        S = (self.Q - self.Q.mT).to(self._cd)
        if self.constraint > 0:
            bound = self.constraint * self.Q.shape[1] * self.Q.shape[2]
            S = S * (bound / torch.maximum(torch.linalg.vector_norm(S) / 2, S.new_tensor(bound)))
        return cayley(S.flatten(0, 1)).view(S.shape)

    def adapted_weight(self):
        W0 = self._w0_matrix().to(self._cd)
        blocks = self.rotation_blocks()
        gathers = butterfly_gathers(blocks.shape[1] * blocks.shape[2], blocks.shape[2], blocks.shape[0], W0.device)
        if self.side == "output":
            W = butterfly(W0, blocks, gathers)
        else:  # W^T = R^T W0^T, R^T = B_0^T ⋯ B_{m-1}^T
            W = butterfly(W0.mT, blocks.mT.flip(0), gathers[::-1]).mT
        return W if self.g is None else self.g[:, None].to(self._cd) * W

    def _forward(self, x):
        if _trains_linear(self) and self.Q.shape[0] <= BUTTERFLY_ROWS_MAX_STAGES \
                and (self.side == "output" or (self.g is None and x.requires_grad)):
            blocks = self.rotation_blocks()
            gathers = butterfly_gathers(blocks.shape[1] * blocks.shape[2], blocks.shape[2], blocks.shape[0], x.device)
            rotate = lambda t: butterfly_rows(t, blocks, gathers)  # noqa: E731
            if self.side == "output":
                return _rotated_output(self, x, rotate)
            xc = x.to(self._cd)
            xr = rotate(xc)
            return self.base((xr if self.scale == 1.0 else torch.lerp(xc, xr, self.scale)).to(x.dtype))
        return self._dense_forward(x)


class KOFT(_Rotation):
    """W = W0 R, R = R_1 ⊗ ... ⊗ R_r (torch.kron order), R_i square orthogonal, identity at start.

    sizes: the factor sizes (product n = in_features, on a conv in_channels·kh·kw); default the
    balanced specops.kron_factor_sizes(n, factors). factors=None means len(sizes), or 3.
    The R_i are Stiefel parameters (orthogonal_parameters()). Forward on a Linear:
    base(kron_matmul(x, [R_i^T])), since x R^T = x (R_1^T ⊗ ... ⊗ R_r^T); on a conv one conv with W.
    """

    method = "koft"

    def __init__(self, base: nn.Linear | nn.Conv2d, *, factors: int | None = None, sizes=None, scale: float = 1.0):
        super().__init__(base, scale=scale)
        W0 = base.weight
        sizes = _kron_sizes(self.cols, self._cols_name, factors, sizes)
        self.factors = _identity_factors(sizes, acc_dtype(W0.dtype), W0.device)
        self._options = {"factors": len(sizes), "sizes": list(sizes)}

    @property
    def _cd(self):
        return self.factors[0].dtype

    def _rotate(self, t, transpose):
        return kron_matmul(t, [f.mT if transpose else f for f in self.factors])

    def orthogonal_parameters(self):
        return list(self.factors)


class _Spectral(_Rebuild):
    """Shared by SVDiff, SODA-SVD, SODA-LQ: the spectral layer run in the compute dtype of δ, and
    SODA's optional Kronecker rotation (none for SVDiff). On a conv the decomposition is of the
    (out, in·kh·kw) matrix and forward builds W (spectral_linear's factored form rotates and
    projects x, which a conv cannot do cheaply) and runs one conv."""

    def __init__(self, base: nn.Linear | nn.Conv2d, *, scale: float):
        super().__init__(base, scale=scale)
        self.side = "input"
        self.factors = nn.ParameterList()

    def _register_factors(self, **factors: Tensor) -> None:
        """Non-persistent buffers (recomputable from W0), cast from float64 to the compute dtype."""
        cd = acc_dtype(self.base.weight.dtype)
        for name, t in factors.items():
            self.register_buffer(name, t.to(cd), persistent=False)

    def _init_rotation(self, side, factors, sizes) -> None:
        """SODA: identity-initialised R_1 ⊗ ... ⊗ R_r over the input (side "input", product cols) or
        over the k right singular / Qh directions (side "basis", product k = min(out, cols)); sizes
        default to SODA_TABLE's published ones, else balanced."""
        self.side = _choice("side", side, SIDES)
        dim, what = (self.cols, self._cols_name) if side == "input" else (
            self.delta.shape[0], f"k = min({self._rows_name}, {self._cols_name})")
        sizes = _kron_sizes(dim, what, factors, sizes, table=SODA_TABLE)
        self.factors = _identity_factors(sizes, self.delta.dtype, self.delta.device)
        self._options.update(side=side, factors=len(sizes), sizes=list(sizes))

    def _rotation(self) -> list[Tensor] | None:
        return list(self.factors) or None

    def orthogonal_parameters(self):
        return list(self.factors)

    def _layer(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x W^T + bias in the compute dtype."""
        raise NotImplementedError

    def _forward(self, x):
        if self.is_conv:
            return self._dense_forward(x)
        bias = self.base.bias
        cd = self.delta.dtype
        with torch.autocast(x.device.type, enabled=False):  # the spectral ops take one dtype: cd
            y = self._layer(x.to(cd), None if bias is None else bias.to(cd)).to(x.dtype)
        return y if self.scale == 1.0 else torch.lerp(self.base(x), y, self.scale)


class SVDiff(_Spectral):
    """W = U diag(act(S + δ)) Vh from the thin SVD W0 = U diag(S) Vh, δ (k,) zero-initialised
    (on a conv, of the (out, in·kh·kw) matrix, as the SVDiff paper reshapes conv kernels).

    activation relu (default), softplus or none. For softplus the buffer S holds softplus^-1 of the
    singular values (clamped at the dtype's tiny), so that the fresh adapter is W0, not
    U diag(softplus(S)) Vh. Forward: specops.spectral_linear (a conv: one conv with W).
    """

    method = "svdiff"

    def __init__(self, base: nn.Linear | nn.Conv2d, *, activation: str = "relu", scale: float = 1.0):
        super().__init__(base, scale=scale)
        self.activation = _choice("activation", activation, ACTIVATIONS)
        U, S, Vh, _ = decompose(base.weight.flatten(1), "svd", dtype=torch.float64)
        if activation == "softplus":  # softplus^-1(s) = s + log(1 - exp(-s))
            S = S.clamp_min(torch.finfo(acc_dtype(base.weight.dtype)).tiny)
            S = S + torch.log(-torch.expm1(-S))
        self._register_factors(U=U, S=S, Vh=Vh)
        self.delta = nn.Parameter(torch.zeros_like(self.S))
        self._options = {"activation": activation}

    def _layer(self, x, bias):
        return spectral_linear(x, self.U, self.S, self.Vh, self.delta, bias, rotation=self._rotation(),
                               side=self.side, activation=self.activation)

    def adapted_weight(self):
        return spectral_shift(self.U, self.S, self.Vh, self.delta, rotation=self._rotation(), side=self.side,
                              activation=self.activation)


class SODASVD(SVDiff):
    """SODA-SVD: SVDiff with a Kronecker rotation R = R_1 ⊗ ... ⊗ R_r (Stiefel factors, R = I at start).

    side="input": W = U diag(s) Vh R^T (the SODA authors' code), ∏ sizes = in_features (a conv:
    in_channels·kh·kw); side="basis": W = U diag(s) (V R)^T (the paper's eq. 5), ∏ sizes =
    k = min(out, in) (a conv: min(out, in·kh·kw)).
    sizes default: specops.SODA_TABLE's entry for that dimension, else balanced kron_factor_sizes;
    factors=None means len(sizes), or 3.
    """

    method = "soda-svd"

    def __init__(self, base: nn.Linear | nn.Conv2d, *, side: str = "input", activation: str = "relu",
                 factors: int | None = None, sizes=None, scale: float = 1.0):
        super().__init__(base, activation=activation, scale=scale)
        self._init_rotation(side, factors, sizes)


class SODALQ(_Spectral):
    """SODA-LQ: W = (L + diag(δ)) Qh from W0 = L Qh (L (out, k) lower-trapezoidal, diag(L) >= 0, Qh
    (k, in) orthonormal rows; a conv's (out, in·kh·kw) matrix), rotated like SODASVD (side "basis":
    W = (L + diag δ) (Qh^T R)^T). Forward: specops.spectral_linear_lq (a conv: one conv with W)."""

    method = "soda-lq"

    def __init__(self, base: nn.Linear | nn.Conv2d, *, side: str = "input", factors: int | None = None, sizes=None,
                 scale: float = 1.0):
        super().__init__(base, scale=scale)
        L, Qh, _ = decompose(base.weight.flatten(1), "lq", dtype=torch.float64)
        self._register_factors(L=L, Qh=Qh)
        self.delta = nn.Parameter(self.L.new_zeros(self.L.shape[1]))
        self._init_rotation(side, factors, sizes)

    def _layer(self, x, bias):
        return spectral_linear_lq(x, self.L, self.Qh, self.delta, bias, rotation=self._rotation(), side=self.side)

    def adapted_weight(self):
        return spectral_shift_lq(self.L, self.Qh, self.delta, rotation=self._rotation(), side=self.side)


# ----------------------------------------------------------------------------- registry

ADAPTER_TYPES: dict[str, type[Adapter]] = {
    cls.method: cls for cls in (LoRA, LoHa, LoKr, AdaLoRA, OFT, BOFT, KOFT, SVDiff, SODASVD, SODALQ, ZipLoRA)
}
# The methods whose adapter also wraps an nn.Conv2d: all but ZipLoRA.
CONV_METHODS: tuple[str, ...] = tuple(m for m, cls in ADAPTER_TYPES.items() if nn.Conv2d in cls.bases)


def make_adapter(method: str, base: nn.Linear | nn.Conv2d, **options) -> Adapter:
    """ADAPTER_TYPES[method](base, **options); base an nn.Linear, or an nn.Conv2d for a method of
    CONV_METHODS. ValueError on an unknown method or option."""
    if method not in ADAPTER_TYPES:
        raise ValueError(f"method: expected one of {tuple(ADAPTER_TYPES)}, got {method!r}")
    cls = ADAPTER_TYPES[method]
    try:
        inspect.signature(cls).bind(base, **options)
    except TypeError as err:
        known = [p for p in inspect.signature(cls).parameters if p != "base"]
        raise ValueError(f"options: {err} ({method!r} takes {known})") from None
    return cls(base, **options)


ZipLoRALinear = ZipLoRA  # the name of specops' ZipLoRA layer in the zip API
