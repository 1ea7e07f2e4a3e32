"""Textual inversion on the tiny SDXL-structured model: new tokens in both CLIP encoders, only their
rows trained, and diffusers' SDXL file (read back by diffusers' own load_textual_inversion) and
A1111's string_to_param file."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from specops import sdxl  # noqa: E402
from specops.sdxl.textual_inversion import SDXL_KEYS, NewTokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread
PROMPT = torch.tensor([[0, 1000, 1001, 17, 2, 1, 1, 1]])  # bos, the two new tokens, a word, eos, padding


def _tables(encoders):
    return [te.get_input_embeddings() for te in encoders]


def test_textual_inversion_trains_only_the_new_rows_beside_an_adapter():
    torch.manual_seed(0)
    enc = sdxl.tiny_text_encoders(0)
    before = [{n: p.detach().clone() for n, p in te.named_parameters()} for te in enc]
    assert sdxl.add_tokens(enc, 2, init_ids=[17, 18]) == [1000, 1001]
    unet = sdxl.tiny_unet(0)
    sdxl.inject(unet, "lora", block_weights={"down_blocks.1": 1.0, "up_blocks.1": 1.0})
    rows = sdxl.token_parameters(enc)
    assert [tuple(r.shape) for r in rows] == [(2, 32), (2, 64)]
    opt = torch.optim.AdamW([*sdxl.param_groups(unet, 1e-3).euclidean, {"params": rows, "lr": 1e-2}])
    base = sdxl.synthetic_batch(enc, batch=1, seed=3, size=8)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = sdxl.denoising_loss(unet, sdxl.with_prompt(base, enc, PROMPT))
        loss.backward()
        assert all(p.grad is None for te in enc for n, p in te.named_parameters() if not n.endswith(".rows"))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.99, losses
    assert all(opt.state[r]["exp_avg"].shape == r.shape for r in rows)  # optimiser state: (n, d) only
    for te, old in zip(enc, before):
        for n, p in te.named_parameters():
            if n.endswith(".rows"):
                continue
            assert torch.equal(p, old[n.replace("token_embedding.table.", "token_embedding.")]), n
    assert not torch.equal(rows[0], _tables(sdxl.tiny_text_encoders(0))[0].weight[[17, 18]])


def _tokenizer(folder):
    """A CLIP tokenizer of the tiny encoders' 1000 ids (no download): specials at CLIP's tiny ids."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    vocab.update({f"w{i}</w>": i for i in range(3, 1000)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _trained(seed=1):
    enc = sdxl.tiny_text_encoders(0)
    sdxl.add_tokens(enc, 2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for r in sdxl.token_parameters(enc):
            r.copy_(torch.randn(r.shape, generator=g))
    return enc


def test_textual_inversion_file_loads_through_diffusers_and_back(tmp_path):
    from diffusers.loaders import TextualInversionLoaderMixin
    from safetensors.torch import load_file

    class Loader(TextualInversionLoaderMixin):  # the mixin a diffusers pipeline carries
        hf_device_map, components = None, {}

    enc = _trained()
    path = tmp_path / "ti.safetensors"
    sdxl.save_textual_inversion(enc, path)
    saved = load_file(path)
    assert sorted(saved) == sorted(SDXL_KEYS) and [saved[k].shape for k in SDXL_KEYS] == [(2, 32), (2, 64)]
    want = sdxl.encode_prompt(enc, PROMPT)

    fresh = sdxl.tiny_text_encoders(0)
    toks = [_tokenizer(tmp_path) for _ in fresh]
    for key, te, tok in zip(SDXL_KEYS, fresh, toks):
        Loader().load_textual_inversion(saved[key], token="<sks>", text_encoder=te, tokenizer=tok)
        assert tok.convert_tokens_to_ids(["<sks>", "<sks>_1"]) == [1000, 1001]
    for te, rows in zip(fresh, sdxl.token_parameters(enc)):
        assert torch.equal(te.get_input_embeddings().weight[1000:], rows)
    for a, b in zip(sdxl.encode_prompt(fresh, PROMPT), want):
        assert torch.equal(a, b)

    mine = sdxl.tiny_text_encoders(0)
    toks = [_tokenizer(tmp_path) for _ in mine]
    assert sdxl.load_textual_inversion(mine, path, tokens=["<a>", "<b>"], tokenizers=toks) == [1000, 1001]
    assert [t.convert_tokens_to_ids("<b>") for t in toks] == [1001, 1001]
    for a, b in zip(sdxl.encode_prompt(mine, PROMPT), want):
        assert torch.equal(a, b)
    sdxl.merge_tokens(mine)  # plain CLIP encoders with 1002 rows, same outputs
    assert all(type(t) is torch.nn.Embedding and t.num_embeddings == 1002 for t in _tables(mine))
    for a, b in zip(sdxl.encode_prompt(mine, PROMPT), want):
        assert torch.equal(a, b)


def test_textual_inversion_reads_a1111_files_and_refuses_bad_input(tmp_path):
    rows = torch.randn(2, 64)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(rows)}, "name": "sks"}, tmp_path / "a1111.pt")
    enc = sdxl.tiny_text_encoders(0)
    assert sdxl.load_textual_inversion(enc, tmp_path / "a1111.pt") == [1000, 1001]
    small, big = sdxl.token_parameters(enc)
    assert torch.equal(big, rows)  # the 64-wide encoder's rows; the other gets its mean row
    assert torch.equal(small, _tables(enc)[0].table.weight.mean(0).expand(2, -1))

    torch.save({"emb": rows}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither diffusers' SDXL keys"):
        sdxl.load_textual_inversion(enc, tmp_path / "other.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 48)}, "name": "x"}, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="width 48 fit none"):
        sdxl.load_textual_inversion(enc, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="n must be a positive int"):
        sdxl.add_tokens(enc, 0)
    with pytest.raises(ValueError, match="hold no new tokens"):
        sdxl.token_parameters(sdxl.tiny_text_encoders(0))
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 1002\)"):
        enc[0](torch.tensor([[0, 1002]]))
    assert isinstance(_tables(enc)[0], NewTokens)
