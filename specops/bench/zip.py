"""ZipLoRA merger training on SDXL attention shapes: specops vs the public (dense ΔW) formulation.

One merger-training step = forward + backward to the mergers only (x, W, b and both rank-64 LoRAs
frozen). Providers:
  specops: zip_lora_linear — both LoRAs and the column scaling in one low-rank pass, no (out, in).
  public:  the public ZipLoRA code's formulation: frozen F.linear(x, W, b) plus a branch that rebuilds
           both dense ΔW = B A every forward, scales their columns by the mergers, sums them and
           applies F.linear (torch autograd).
Shapes "... layer" time the whole layer, "... branch" the adapter branch alone (weight=None for
specops, F.linear(x, ΔW_m) for public; the base GEMM is the same in both), "... base" the frozen
base GEMM by itself. "penalty ..." is merger_penalty over the 560 SDXL attention layers: one
multi-tensor op vs a Python loop over layers (forward + backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from specops.zip import merger_penalty, merger_penalty_reference, zip_lora_linear

from . import SDXL_LAYERS, Case, min_ms, rng, sdxl_attention_layers, verdict

BASELINE = "public"
RANK = 64
TOKENS = (2 * 1024, 2 * 4096)
TARGETS = {"branch": 3.0, "layer": 2.5}


def sdxl_attention_widths() -> list[int]:
    """in_features of the 560 SDXL-base attention Linear layers (see sdxl_attention_layers)."""
    return [n for _, _, n in sdxl_attention_layers()]


def _layer_inputs(in_f, out_f, tokens, gen):
    x = torch.randn(2, tokens // 2, in_f, generator=gen)
    W = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, generator=gen)
    lora = [torch.randn(out_f, RANK, generator=gen) / RANK, torch.randn(RANK, in_f, generator=gen) / in_f**0.5]
    lora += [torch.randn(out_f, RANK, generator=gen) / RANK, torch.randn(RANK, in_f, generator=gen) / in_f**0.5]
    m_c = torch.ones(in_f, requires_grad=True)
    m_s = torch.ones(in_f, requires_grad=True)
    return x, W, b, lora, m_c, m_s


def _public_branch(x, B_c, A_c, m_c, B_s, A_s, m_s, scale):
    delta = (scale * (B_c @ A_c)) * m_c + (scale * (B_s @ A_s)) * m_s
    return F.linear(x, delta)


def _step_setup(in_f, out_f, tokens, provider, part):
    def setup():
        gen = rng()
        x, W, b, (B_c, A_c, B_s, A_s), m_c, m_s = _layer_inputs(in_f, out_f, tokens, gen)
        gy = torch.randn(2, tokens // 2, out_f, generator=gen)
        scale = 1.0  # alpha / r
        weight, bias = (W, b) if part == "layer" else (None, None)

        def specops_step():
            y = zip_lora_linear(x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s, scale, scale)
            y.backward(gy)
            m_c.grad = m_s.grad = None

        def public_step():
            y = _public_branch(x, B_c, A_c, m_c, B_s, A_s, m_s, scale)
            if part == "layer":
                y = F.linear(x, W, b) + y
            y.backward(gy)
            m_c.grad = m_s.grad = None

        def base():
            with torch.no_grad():
                F.linear(x, W, b)

        return {"specops": specops_step, "public": public_step, "base": base}[provider]

    return setup


def _penalty_setup(provider, kind):
    def setup():
        gen = rng()
        widths = sdxl_attention_widths()
        mc = [(1 + 0.1 * torch.randn(n, generator=gen)).requires_grad_() for n in widths]
        ms = [(1 + 0.1 * torch.randn(n, generator=gen)).requires_grad_() for n in widths]
        fn = merger_penalty if provider == "specops" else merger_penalty_reference

        def step():
            fn(mc, ms, kind).backward()
            for t in mc + ms:
                t.grad = None

        return step

    return setup


def _flops(in_f, out_f, tokens, part):
    """Minimal FLOPs of a merger step: 4 thin (T x 2r) GEMMs, plus the base GEMM for the layer."""
    branch = 2.0 * tokens * 2 * RANK * (in_f + out_f) * 2
    base = 2.0 * tokens * in_f * out_f
    return {"layer": branch + base, "branch": branch, "base": base}[part]


def _bytes(in_f, out_f, tokens, part):
    """x read twice (forward, merger gradient), grad_y once, y written (fp32)."""
    act = 4.0 * tokens * (2 * in_f + 2 * out_f)
    return act + (4.0 * in_f * out_f if part != "branch" else 0.0)


def cases(quick: bool = False) -> list[Case]:
    out = []
    layers = ((1280, 1280),) if quick else SDXL_LAYERS
    tokens_list = (2048,) if quick else TOKENS
    for in_f, out_f in layers:
        for tokens in tokens_list:
            for part in ("layer", "branch", "base"):
                shape = f"{in_f}->{out_f} T={tokens} {part}"
                provs = ("base",) if part == "base" else ("specops", "public")
                for prov in provs:
                    out.append(Case("zip", shape, prov, _step_setup(in_f, out_f, tokens, prov, part),
                                    _flops(in_f, out_f, tokens, part), _bytes(in_f, out_f, tokens, part)))
    for kind in ("abs_product",) if quick else ("abs_product", "dot", "cosine"):
        for prov in ("specops", "public"):
            n = sum(sdxl_attention_widths())
            out.append(Case("zip", f"penalty 560 layers {kind} fwd+bwd", prov, _penalty_setup(prov, kind), 0.0, 4.0 * 4 * n))
    return out


def extra_bytes_model(in_f: int, out_f: int, tokens: int) -> int:
    """Extra fp32 bytes specops keeps for one merger step: A', B' ((in + out)·2r), h or u (T·2r),
    G (2r·in), merger gradients (2·in)."""
    r = 2 * RANK
    return 4 * ((in_f + out_f) * r + tokens * r + r * in_f + 2 * in_f)


def _bound(find: dict, shape: str, by: dict) -> float | None:
    """public / the least time the shape allows: the branch at the roof of its FLOP and byte counts, plus
    (whole layer) the frozen base GEMM as measured, which both providers run. find: {(shape, provider): row}."""
    part = shape.split()[-1]
    branch = find.get((shape.replace(f" {part}", " branch"), "specops"))
    if "roof" not in (branch or {}) or part not in ("branch", "layer"):
        return None
    least = min_ms(branch)
    if part == "layer":
        base = find.get((shape.replace(" layer", " base"), "base"))
        if base is None:
            return None
        least += base["ms"]
    return by["public"]["ms"] / least


def summarize(rows: list[dict]) -> str:
    """Ratios public / specops per shape against the issue's targets, and the peak bytes if measured."""
    lines = [f"targets: adapter branch >= {TARGETS['branch']:g}x, whole layer >= {TARGETS['layer']:g}x "
             "faster than public; penalty: one launch vs Python loop"]
    find = {(r["shape"], r["provider"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["provider"]: r for r in rows if r["shape"] == shape}
        if "specops" not in by or "public" not in by:
            continue
        ratio = by["public"]["ms"] / by["specops"]["ms"]
        part = shape.split()[-1]
        target = TARGETS.get(part)
        line = f"- {shape}: specops {by['specops']['ms']:.2f} ms, public {by['public']['ms']:.2f} ms: {ratio:.2f}x"
        bound = _bound(find, shape, by)
        if bound is not None:
            line += f", bound {bound:.2f}x"
        if target is not None:
            line += f" (target {target:g}x: {verdict(ratio, target, bound)})"
        if "peak MB" in by["specops"]:
            line += f"; peak MB specops {by['specops']['peak MB']:.1f} vs public {by['public']['peak MB']:.1f}"
            if part == "branch":
                in_f, out_f = (int(v) for v in shape.split()[0].split("->"))
                tokens = int(shape.split()[1].split("=")[1])
                line += f" (model of specops' extra: {extra_bytes_model(in_f, out_f, tokens) / 2**20:.1f} MB)"
        lines.append(line)
    return "\n".join(lines)
