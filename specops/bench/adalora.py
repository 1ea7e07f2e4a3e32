"""AdaLoRA: specops.adalora beside HF PEFT's AdaLoRA (its SVDLinear and RankAllocator).

"step" shapes: one training step (forward, backward of a fixed output gradient, the input requiring
grad as inside a UNet) of one SDXL Linear with init_r 12 at 2x1024 tokens. Providers: peft (PEFT's
SVDLinear), specops (specops.adapters.AdaLoRA), specops r=8 (the same layer compacted to 8 kept triplets, as
after the final phase; PEFT keeps computing all 12), frozen (the base layer alone).
"branch" shapes: the same step of the adapter's update alone (a base that costs nothing: it returns
zeros), where the rank shows: "kept r=k" has k of the 12 triplets left; PEFT keeps computing all 12
(masked ones as zeros), specops r=k is compacted to k. flops / bytes: 6·T·k·(in+out) FLOPs (the two
products of the forward, four of the backward), and the rank-independent traffic, 3·(in + out)·T floats:
the forward reads x and the base output and writes its sum with the update, the backward reads the
output gradient and x and writes x's gradient. A step takes a fixed time for those bytes plus a time
proportional to k, so compaction cuts the second part in proportion to k.
"block" shape: the same step of every attention and feed-forward Linear of one 1280-wide SDXL
transformer block (attn1 q/k/v/out and attn2 q/out on 2x1024 tokens, attn2 k/v 2048->1280 on the 2x77
text tokens, ff 1280->10240 and 5120->1280), each on its own input, all adapted (init_r 12).
"allocate" shapes: one update_and_allocate of the allocator over the tiny UNet's 722 attention,
feed-forward and proj layers (init_r 12, target_r 8), gradients set, at a step that masks and at one
that only updates the importance.
"""
from __future__ import annotations

import torch
from torch import nn

from specops import adalora, adapters, sdxl

from . import SDXL_LAYERS, Case, installed, rng
from .peers import _Holder

BASELINE = "peft"
INIT_R, TARGET_R, TOKENS = 12, 8, 2 * 1024
SCHEDULE = dict(tinit=0, tfinal=0, deltaT=2, total_step=10**6, beta1=0.85, beta2=0.85)


def _peft_config(targets):
    from peft import AdaLoraConfig

    return AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=INIT_R, target_modules=targets, **SCHEDULE)


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)


class _ZeroBase(nn.Linear):
    """A base layer that costs nothing but its zero output (the "branch" shapes)."""

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _step_setup(in_f, out_f, provider, kept=INIT_R, branch=False):
    def setup():
        gen = rng()
        base = (_ZeroBase if branch else nn.Linear)(in_f, out_f)
        x = torch.randn(2, TOKENS // 2, in_f, generator=gen, requires_grad=True)
        gy = torch.randn(2, TOKENS // 2, out_f, generator=gen)
        if provider == "frozen":
            layer = base.requires_grad_(False)
        elif provider == "peft":
            from peft import inject_adapter_in_model

            layer = inject_adapter_in_model(_peft_config(["layer"]), _Holder(base))
        else:
            layer = adapters.AdaLoRA(base, init_r=INIT_R)
            if provider.startswith("specops r="):
                with torch.no_grad():
                    layer.lam[kept:] = 0
                    layer.lam[:kept] = 1
                layer.compact()
        _randomise([p for n, p in layer.named_parameters() if p.requires_grad and "lora_E" not in n])
        if provider == "peft" and kept < INIT_R:
            with torch.no_grad():
                layer.layer.lora_E["default"][kept:] = 0

        def step():
            layer(x).backward(gy)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        return step

    return setup


# (name, in, out, tokens) of the Linear layers of one 1280-wide SDXL transformer block
BLOCK = [(f"attn1_{p}", 1280, 1280, TOKENS) for p in ("to_q", "to_k", "to_v", "to_out")] + [
    ("attn2_to_q", 1280, 1280, TOKENS), ("attn2_to_k", 2048, 1280, 2 * 77), ("attn2_to_v", 2048, 1280, 2 * 77),
    ("attn2_to_out", 1280, 1280, TOKENS), ("ff_proj", 1280, 10240, TOKENS), ("ff_out", 5120, 1280, TOKENS)]


def _block_setup(provider):
    def setup():
        gen = rng()
        block = nn.ModuleDict({n: nn.Linear(i, o) for n, i, o, _ in BLOCK})
        xs = {n: torch.randn(t, i, generator=gen, requires_grad=True) for n, i, _, t in BLOCK}
        gys = {n: torch.randn(t, o, generator=gen) for n, _, o, t in BLOCK}
        if provider == "frozen":
            block.requires_grad_(False)
        elif provider == "peft":
            from peft import inject_adapter_in_model

            block = inject_adapter_in_model(_peft_config([n for n, *_ in BLOCK]), block)
        else:
            sdxl.inject(block, "adalora", targets=[n for n, *_ in BLOCK], init_r=INIT_R)
        _randomise([p for n, p in block.named_parameters() if p.requires_grad and "lora_E" not in n])

        def step():
            sum((block[n](xs[n]) * gys[n]).sum() for n in xs).backward()
            for t in (*xs.values(), *block.parameters()):
                t.grad = None

        return step

    return setup


def unet_targets(unet: nn.Module) -> list[str]:
    """The tiny UNet's Linear layers inside its transformer blocks (attention, feed-forward, proj): 722."""
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attentions." in n]


def _allocate_setup(provider, masking):
    def setup():
        from specops.sdxl import tiny_unet

        unet = tiny_unet(0)
        targets = unet_targets(unet)
        if provider == "peft":
            from peft import get_peft_model

            model = get_peft_model(unet, _peft_config(targets))
            params = [p for n, p in model.named_parameters() if "lora_" in n]
            allocate = model.base_model.update_and_allocate
        else:
            sdxl.inject(unet, "adalora", targets=targets, init_r=INIT_R)
            alloc = adalora.RankAllocator(unet, target_r=TARGET_R, **SCHEDULE)
            params = [p for n, p in unet.named_parameters() if p.requires_grad]
            allocate = alloc.update_and_allocate
        gen = rng()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        step = 2 if masking else 3  # deltaT = 2
        return lambda: allocate(step)

    return setup


def cases(quick: bool = False) -> list[Case]:
    out = []
    providers = ("peft", "specops", "specops r=8", "frozen") if installed("peft") else ("specops", "specops r=8", "frozen")
    for in_f, out_f in SDXL_LAYERS[1:2] if quick else SDXL_LAYERS:
        shape = f"step {in_f}->{out_f} r={INIT_R}"
        out += [Case("adalora", shape, p, _step_setup(in_f, out_f, p, TARGET_R if p == "specops r=8" else INIT_R))
                for p in providers]
    in_f, out_f = SDXL_LAYERS[1]
    for kept in (INIT_R,) if quick else (INIT_R, TARGET_R, 4):
        shape = f"branch {in_f}->{out_f} kept r={kept}"
        providers = (["peft"] if installed("peft") else []) + [f"specops r={kept}"]
        cost = dict(flops=6.0 * TOKENS * kept * (in_f + out_f), bytes=4.0 * TOKENS * 3 * (in_f + out_f))
        out += [Case("adalora", shape, p, _step_setup(in_f, out_f, p, kept, branch=True), **cost) for p in providers]
    if not quick:
        out += [Case("adalora", "block 1280 (10 layers) r=12", p, _block_setup(p))
                for p in ("peft", "specops", "frozen") if p != "peft" or installed("peft")]
        for masking in (True, False):
            shape = f"allocate 722 layers {'masking' if masking else 'importance only'}"
            out += [Case("adalora", shape, p, _allocate_setup(p, masking)) for p in ("peft", "specops")
                    if p != "peft" or installed("peft")]
    return out
