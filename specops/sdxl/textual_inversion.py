"""Textual inversion on SDXL's two CLIP text encoders: new tokens whose embedding rows alone train.

    add_tokens(text_encoders, n, ...)       n new token ids (V .. V+n-1) in both encoders, trainable rows
    token_parameters(text_encoders)         those rows, for an optimiser
    save_textual_inversion / load_textual_inversion
                                            diffusers' SDXL file {"clip_l": (n, d1), "clip_g": (n, d2)};
                                            load also reads A1111's {"string_to_param": {"*": (n, d)}}
    merge_tokens(text_encoders)             back to a plain CLIP encoder with a (V + n)-row table

Each encoder's token embedding becomes a NewTokens module: the frozen (V, d) table and a trainable
(n, d) block for ids V..V+n-1. Its gradient and the optimiser's state are (n, d), never (V, d), and
the table's rows stay bit-identical. Combinable with any adapter method: the encoders' outputs feed
the UNet's conditioning in the same step.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .injection import _adapters

__all__ = ["NewTokens", "add_tokens", "token_parameters", "save_textual_inversion", "load_textual_inversion",
           "merge_tokens", "SDXL_KEYS"]

# diffusers' SDXL textual-inversion keys, in text-encoder order (CLIP ViT-L, then OpenCLIP ViT-bigG).
SDXL_KEYS = ("clip_l", "clip_g")


class NewTokens(nn.Module):
    """E(i) = table[i] for i < V, rows[i − V] for V <= i < V + n (table frozen, rows trained)."""

    def __init__(self, table: nn.Embedding, rows: Tensor):
        super().__init__()
        if rows.dim() != 2 or rows.shape[1] != table.embedding_dim:
            raise ValueError(f"textual inversion: rows must be (n, {table.embedding_dim}), got {tuple(rows.shape)}")
        self.table = table.requires_grad_(False)
        self.rows = nn.Parameter(rows.detach().to(table.weight).clone())

    @property
    def vocab(self) -> int:
        return self.table.num_embeddings

    def forward(self, ids: Tensor) -> Tensor:
        V, n = self.vocab, len(self.rows)
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))  # one host sync per forward
            if lo < 0 or hi >= V + n:
                raise IndexError(f"textual inversion: token ids must lie in [0, {V + n}), got [{lo}, {hi}]")
        old = self.table(ids.clamp(max=V - 1))
        return torch.where((ids >= V).unsqueeze(-1), nn.functional.embedding((ids - V).clamp(min=0), self.rows), old)


def _table(encoder: nn.Module) -> nn.Embedding:
    m = encoder.get_input_embeddings()
    return m.table if isinstance(m, NewTokens) else m


def _new_tokens(text_encoders) -> list[NewTokens]:
    found = [te.get_input_embeddings() for te in text_encoders]
    if not all(isinstance(m, NewTokens) for m in found):
        raise ValueError("textual inversion: the text encoders hold no new tokens; call add_tokens first")
    return found


def add_tokens(text_encoders, n: int | None = None, *, init: Tensor | list[Tensor] | None = None,
               init_ids: list[int] | None = None, tokens: list[str] | None = None, tokenizers=None) -> list[int]:
    """Add n new tokens to every encoder (SDXL's two share the vocabulary); returns their ids V..V+n-1.

    Rows start from `init` (one (n, d) tensor per encoder), else from the embeddings of `init_ids`
    (one id per new token, e.g. the class word), else from the table's mean row. With `tokenizers`
    (one per encoder) and `tokens` (n strings), the strings are added to each tokenizer, which must
    give them the same ids. Adding to encoders that already hold new tokens extends them. The
    encoders' own weights are frozen (their adapters, if any, keep training).
    """
    if init is not None and not isinstance(init, (list, tuple)):
        init = [init]
    if n is None:
        n = len(tokens) if tokens is not None else len(init[0]) if init is not None else len(init_ids or ())
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"add_tokens: n must be a positive int, got {n!r}")
    if init is not None and len(init) != len(text_encoders):
        raise ValueError(f"add_tokens: init holds {len(init)} tensors for {len(text_encoders)} text encoders")
    if init_ids is not None and len(init_ids) != n:
        raise ValueError(f"add_tokens: init_ids holds {len(init_ids)} ids for {n} new tokens")
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"add_tokens: tokens holds {len(tokens)} strings for {n} new tokens")
    current = [te.get_input_embeddings() for te in text_encoders]
    sizes = {m.vocab + len(m.rows) if isinstance(m, NewTokens) else m.num_embeddings for m in current}
    if len(sizes) != 1:
        raise ValueError(f"add_tokens: the text encoders' vocabularies differ ({sorted(sizes)}); SDXL's share one")
    start = sizes.pop()
    ids = list(range(start, start + n))
    if tokenizers is not None:
        if tokens is None:
            raise ValueError("add_tokens: tokenizers need the new tokens' strings (tokens=)")
        for tok in tokenizers:
            if len(tok) != start:
                raise ValueError(f"add_tokens: a tokenizer of {len(tok)} tokens for an encoder of {start}")
            tok.add_tokens(list(tokens))
            if tok.convert_tokens_to_ids(list(tokens)) != ids:
                raise ValueError(f"add_tokens: the tokenizer gave {tokens} ids other than {ids} (already known?)")
    for k, (te, m) in enumerate(zip(text_encoders, current)):
        table = _table(te)
        with torch.no_grad():
            if init is not None:
                rows = init[k]
            elif init_ids is not None:
                rows = m(torch.tensor(init_ids))
            else:
                rows = table.weight.mean(0, keepdim=True).expand(n, -1)
            if isinstance(m, NewTokens):
                rows = torch.cat([m.rows, rows.to(m.rows)])
        new = NewTokens(table, rows)
        te.set_input_embeddings(new)
        adapted = tuple(f"{name}." for name in _adapters(te))
        for name, p in te.named_parameters():
            if p is not new.rows and not name.startswith(adapted):
                p.requires_grad_(False)
    return ids


def token_parameters(text_encoders) -> list[nn.Parameter]:
    """The new tokens' rows of every encoder: the only parameters textual inversion trains."""
    return [m.rows for m in _new_tokens(text_encoders)]


def save_textual_inversion(text_encoders, path: str | os.PathLike) -> None:
    """Write the new rows as diffusers' SDXL file: safetensors {"clip_l": (n, d1), "clip_g": (n, d2)}."""
    from safetensors.torch import save_file

    rows = _new_tokens(text_encoders)
    if len(rows) != len(SDXL_KEYS):
        raise ValueError(f"save_textual_inversion: SDXL's format holds {len(SDXL_KEYS)} encoders, got {len(rows)}")
    save_file({k: m.rows.detach().contiguous() for k, m in zip(SDXL_KEYS, rows)}, os.fspath(path))


def _read(path) -> list[Tensor] | Tensor:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and all(k in data for k in SDXL_KEYS):
        return [data[k] for k in SDXL_KEYS]
    if isinstance(data, dict) and "string_to_param" in data:  # A1111: one encoder's rows
        return data["string_to_param"]["*"]
    raise ValueError(f"load_textual_inversion: {path} holds neither diffusers' SDXL keys {SDXL_KEYS} nor A1111's "
                     f"string_to_param; found {sorted(data)[:4] if isinstance(data, dict) else type(data).__name__}")


def load_textual_inversion(text_encoders, path: str | os.PathLike, **kwargs) -> list[int]:
    """Add the tokens of a textual-inversion file (diffusers' SDXL keys, or A1111's string_to_param,
    whose rows go to the encoder of their width, the other encoder's new rows being its mean row);
    returns their ids.
    kwargs: add_tokens's tokens / tokenizers."""
    rows = _read(path)
    if isinstance(rows, Tensor):
        rows = rows.detach().reshape(-1, rows.shape[-1])
        tables = [_table(te) for te in text_encoders]
        widths = [t.embedding_dim for t in tables]
        if widths.count(rows.shape[1]) != 1:
            raise ValueError(f"load_textual_inversion: rows of width {rows.shape[1]} fit none or several of the "
                             f"encoders (widths {widths})")
        rows = [rows if t.embedding_dim == rows.shape[1] else t.weight.detach().mean(0).expand(len(rows), -1)
                for t in tables]
    if len(rows) != len(text_encoders) or len({len(r) for r in rows}) != 1:
        raise ValueError(f"load_textual_inversion: {len(rows)} row blocks of {[len(r) for r in rows]} tokens for "
                         f"{len(text_encoders)} encoders")
    return add_tokens(text_encoders, init=rows, **kwargs)


def merge_tokens(text_encoders) -> None:
    """Replace each NewTokens by a plain nn.Embedding of V + n rows (table, then the new rows):
    the encoder is an ordinary CLIP text model again (e.g. for a diffusers pipeline)."""
    for te, m in zip(text_encoders, _new_tokens(text_encoders)):
        table = m.table.weight
        emb = nn.Embedding(m.vocab + len(m.rows), table.shape[1], device=table.device, dtype=table.dtype)
        with torch.no_grad():
            emb.weight.copy_(torch.cat([table, m.rows]))
        te.set_input_embeddings(emb.requires_grad_(False))
        te.config.vocab_size = emb.num_embeddings
