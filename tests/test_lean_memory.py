"""library.models.lean: less memory for training, the same bits out (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GEGLU
from safetensors.torch import load_file
from support import run_job, write_job

from library.models import lean
from library.models.loading import load_sd1, save_sd1_single_file


def _geglu_run(module: GEGLU, x: torch.Tensor, grad: torch.Tensor, autocast: bool = False):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = module(x)
    out.backward(grad)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if t.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in module.parameters()}}
    return out.detach(), x.grad, module.proj.weight.grad, module.proj.bias.grad, sum(storages.values())


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_lean_geglu_gives_the_stock_bits_and_keeps_less(dtype, autocast):
    torch.manual_seed(0)
    module = GEGLU(24, 40).to(dtype)
    x, grad = torch.randn(2, 16, 24, dtype=dtype), torch.randn(2, 16, 40)
    grad = grad.to(torch.bfloat16 if autocast else dtype)
    stock = _geglu_run(module, x, grad, autocast)
    assert lean.lean_geglu(torch.nn.Sequential(module)) == 1
    assert lean.lean_geglu(module) == 1  # idempotent
    patched = _geglu_run(module, x, grad, autocast)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), stock[:4], patched[:4]):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # the stock expression keeps the projection and gelu(gate); the lean one the projection alone
    assert patched[4] == stock[4] - 2 * 16 * 40 * stock[0].element_size()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        assert torch.equal(module(x), stock[0])


def test_half_token_embedding_is_exact_and_halves_the_table(tiny_single_file):
    model = load_sd1(tiny_single_file)
    te = model.text_encoder
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        want = te(ids).last_hidden_state
    table = te.get_input_embeddings().weight
    # what an fp16 checkpoint read into float32 holds: values float16 represents exactly
    with torch.no_grad():
        table.copy_(table.half().float())
        want = te(ids).last_hidden_state
    assert lean.half_token_embedding(te) and lean.half_token_embedding(te)
    assert te.get_input_embeddings().weight.dtype == torch.float16
    with torch.no_grad():
        got = te(ids).last_hidden_state
    assert got.dtype == torch.float32 and torch.equal(got, want)
    lean.full_token_embedding(te)
    assert te.get_input_embeddings().weight.dtype == torch.float32 and "forward" not in te.get_input_embeddings().__dict__
    with torch.no_grad():
        assert torch.equal(te(ids).last_hidden_state, want)


def test_half_token_embedding_leaves_what_float16_cannot_hold_or_what_trains(tiny_single_file):
    te = load_sd1(tiny_single_file).text_encoder
    table = te.get_input_embeddings().weight
    with torch.no_grad():
        table[5, 0] = 1.0 + 2.0 ** -20  # not a float16 number
    before = table.detach().clone()
    assert not lean.half_token_embedding(te)
    assert te.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(te.get_input_embeddings().weight, before)
    with torch.no_grad():
        table.copy_(table.half().float())
    table.requires_grad_(True)
    assert not lean.half_token_embedding(te)


def test_embeddings_added_for_sampling_keep_their_float32_rows(tiny_single_file):
    from library.embeddings import Embedding, add_embeddings

    model = load_sd1(tiny_single_file)
    te = model.text_encoder
    with torch.no_grad():
        te.get_input_embeddings().weight.copy_(te.get_input_embeddings().weight.half().float())
    assert lean.half_token_embedding(te)
    width = te.get_input_embeddings().weight.shape[1]
    vector = torch.full((1, width), 1.0 + 2.0 ** -20)
    add_embeddings(model.tokenizer, te, [Embedding("leantoken", vector, "test")])
    table = te.get_input_embeddings().weight
    assert table.dtype == torch.float32
    assert torch.equal(table[model.tokenizer.convert_tokens_to_ids("leantoken")], vector[0])


def test_lora_training_is_bit_identical_with_the_lean_parts(tmp_path, tiny_single_file, shapes_dir, monkeypatch):
    """A LoRA run on an fp16 checkpoint: the text encoder's table is kept in float16, the GEGLUs and residual
    blocks keep less, and the trained file is the same, bit for bit, as with none of that."""
    from library.training import loop

    fp16 = tmp_path / "tiny-fp16.safetensors"
    save_sd1_single_file(fp16, load_sd1(tiny_single_file), dtype=torch.float16)
    seen = []
    inner = lean.half_token_embedding
    monkeypatch.setattr(loop, "half_token_embedding", lambda te: seen.append(inner(te)) or seen[-1])
    job = write_job(tmp_path / "lean", fp16, shapes_dir, max_train_steps=3)
    run_job(job)
    assert seen == [True]
    monkeypatch.setattr(loop, "half_token_embedding", lambda te: False)
    monkeypatch.setattr(loop, "lean_geglu", lambda unet: 0)
    monkeypatch.setattr(loop, "lean_resnets", lambda unet: 0)
    job = write_job(tmp_path / "stock", fp16, shapes_dir, max_train_steps=3)
    run_job(job)
    lean_file, stock_file = load_file(tmp_path / "lean/out/lora.safetensors"), load_file(tmp_path / "stock/out/lora.safetensors")
    assert lean_file.keys() == stock_file.keys()
    for key in stock_file:
        assert torch.equal(lean_file[key], stock_file[key]), key


@pytest.mark.parametrize("dtype,layout", [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)])
def test_lean_resnets_give_the_stock_bits(tiny_single_file, dtype, layout):
    """The tiny U-Net's residual blocks, forward and backward, with and without the lean GroupNorm → SiLU."""
    torch.manual_seed(0)
    unet = load_sd1(tiny_single_file).unet.to(dtype).to(memory_format=layout)
    unet.requires_grad_(True)
    blocks = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 16, 16, dtype=dtype).contiguous(memory_format=layout)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, dtype=dtype)

    def run():
        unet.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = unet(xi, t, encoder_hidden_states=ctx).sample
        out.float().square().mean().backward()
        return [out.detach(), xi.grad] + [p.grad for p in unet.parameters()]

    stock = run()
    assert lean.lean_resnets(unet) == len(blocks) > 0
    assert lean.lean_resnets(unet) == len(blocks)  # idempotent
    patched = run()
    assert len(stock) == len(patched)
    for k, (a, b) in enumerate(zip(stock, patched)):
        assert (a is None and b is None) or torch.equal(a, b), k


def test_lean_groupnorm_silu_keeps_one_activation_less():
    norm, silu = torch.nn.GroupNorm(4, 16), torch.nn.SiLU()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)

    def saved_bytes(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        params = {p.untyped_storage().data_ptr() for p in norm.parameters()}
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                    if t.untyped_storage().data_ptr() not in params}.values())

    stock = saved_bytes(lambda: silu(norm(x)))
    patched = saved_bytes(lambda: lean._norm_silu(norm, silu, x))
    assert stock - patched == x.numel() * 4
