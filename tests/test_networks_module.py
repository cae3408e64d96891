"""The LoCon module on the tiny SD1 model: patching, multiplier, merging, dropout, dtypes, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from library.errors import NetworkFileError
from library.models.architecture import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, build_text_encoder, build_unet
from networks import NetworkSpec, create_network
from networks.targets import CONV, TE


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET_CONFIG).eval()
    te = build_text_encoder(TINY_TEXT_CONFIG).eval()
    return unet, te


@pytest.fixture()
def models(tiny_models):
    unet, te = tiny_models
    return copy.deepcopy(unet), copy.deepcopy(te)


SPEC = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 7, TINY_UNET_CONFIG["cross_attention_dim"], generator=g))


def run_unet(unet):
    sample, t, context = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample


def randomize(network, seed=2, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.locon.values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_fresh_network_is_identity_and_base_is_untouched(models):
    unet, te = models
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base_out = run_unet(unet)
    network = create_network(SPEC, unet, te)
    network.apply_to()
    assert torch.equal(run_unet(unet), base_out)
    # the network holds only its own tensors: no base weight is registered or copied into it
    own = sum(p.numel() for p in network.parameters())
    assert own == network.parameter_count()
    assert all(not k.startswith("base") for k in network.state_dict())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_patched_layer_computes_base_plus_scaled_update(models):
    unet, te = models
    network = create_network(SPEC, unet, te)
    randomize(network)
    network.apply_to()
    network.set_multiplier(0.7)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                 "lora_unet_mid_block_attentions_0_proj_in"):
        module = network[name]
        base = module.base
        x = torch.randn(2, base.in_features) if isinstance(base, torch.nn.Linear) else torch.randn(2, base.in_channels, 8, 8)
        down, up, scale = module.lora_down.weight, module.lora_up.weight, module.alpha / module.rank
        with torch.no_grad():
            if isinstance(base, torch.nn.Linear):
                expected = F.linear(x, base.weight, base.bias) + 0.7 * scale * (x @ down.T @ up.T)
            else:
                original = F.conv2d(x, base.weight, base.bias, base.stride, base.padding)
                low_rank = F.conv2d(F.conv2d(x, down, None, base.stride, base.padding), up)
                expected = original + 0.7 * scale * low_rank
            assert torch.allclose(base(x), expected, atol=1e-5), name


def test_multiplier_zero_equals_base_and_restore_unpatches(models):
    unet, te = models
    base_out = run_unet(unet)
    network = create_network(SPEC, unet, te)
    randomize(network)
    network.apply_to()
    assert not torch.allclose(run_unet(unet), base_out)
    network.set_multiplier(0.0)
    assert torch.equal(run_unet(unet), base_out)
    network.set_multiplier(1.0)
    network.restore()
    assert torch.equal(run_unet(unet), base_out)
    assert all("forward" not in m.base.__dict__ for m in network.locon.values())


def test_merge_to_matches_patched_output(models):
    unet, te = models
    network = create_network(SPEC, unet, te)
    randomize(network)
    network.apply_to()
    network.set_multiplier(0.8)
    patched = run_unet(unet)
    tokens = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        te_patched = te(tokens).last_hidden_state
    network.merge_to()
    assert torch.allclose(run_unet(unet), patched, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(te(tokens).last_hidden_state, te_patched, atol=1e-4)
    with pytest.raises(RuntimeError, match="already merged"):
        network.apply_to()


def test_two_networks_stack_and_restore_in_reverse(models):
    unet, te = models
    base_out = run_unet(unet)
    a = create_network(SPEC, unet, None)
    b = create_network(SPEC, unet, None)
    randomize(a, seed=3)
    randomize(b, seed=4)
    a.apply_to()
    b.apply_to()
    both = run_unet(unet)
    b.set_multiplier(0)
    only_a = run_unet(unet)
    assert not torch.allclose(both, only_a)
    with pytest.raises(RuntimeError, match="reverse order"):
        a.restore()
    b.restore()
    assert torch.equal(run_unet(unet), only_a)
    a.restore()
    assert torch.equal(run_unet(unet), base_out)


def test_dropout_variants_only_in_training(models):
    unet, te = models
    spec = NetworkSpec(network_dim=4, network_alpha=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    network = create_network(spec, unet, te)
    randomize(network)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    module = network[name]
    x = torch.randn(3, 5, module.base.in_features)
    network.eval()
    reference = module.lora_output(x)
    assert torch.equal(module.lora_output(x), reference)  # deterministic in eval
    network.train()
    torch.manual_seed(0)
    outputs = [module.lora_output(x) for _ in range(4)]
    assert not torch.allclose(outputs[0], outputs[1])
    # module dropout: some training forwards skip the branch entirely (base output only)
    network.apply_to()
    with torch.no_grad():
        base_only = torch.nn.functional.linear(x, module.base.weight, module.base.bias)
        skipped = sum(torch.equal(module.base(x), base_only) for _ in range(40))
    assert 5 < skipped < 35


def test_rank_dropout_drops_whole_rank_channels(models):
    unet, te = models
    network = create_network(NetworkSpec(network_dim=8, network_alpha=8, conv_dim=8, conv_alpha=8,
                                         rank_dropout=0.5), unet, None)
    conv = next(m for m in network.locon.values() if m.target.kind == CONV)
    with torch.no_grad():
        conv.lora_up.weight.copy_(torch.eye(conv.lora_up.weight.shape[0], 8)[:, :, None, None])
    network.train()
    x = torch.randn(2, conv.base.in_channels, 8, 8)
    out = conv.lora_output(x)[:, :8]  # up is identity on the first 8 channels: out = h * mask * 2
    zero_channels = (out.abs().sum(dim=(2, 3)) == 0)
    assert zero_channels.any() and not zero_channels.all()


def test_low_precision_base_with_fp32_network(models):
    unet, te = models
    te16 = te.to(torch.bfloat16)
    network = create_network(NetworkSpec(network_dim=4, network_alpha=4, train_unet=False), None, te16)
    randomize(network)
    network.apply_to()
    out = te16(torch.tensor([[0, 5, 9, 2]])).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    module = network["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert module.lora_down.weight.dtype == torch.float32
    # gradients reach the fp32 LoRA weights through the bf16 forward
    out.float().square().mean().backward()
    assert module.lora_up.weight.grad is not None and module.lora_up.weight.grad.dtype == torch.float32


def test_autocast_with_fp32_network(models):
    unet, te = models
    network = create_network(NetworkSpec(network_dim=4, network_alpha=4, conv_dim=2), unet, None)
    randomize(network)
    network.apply_to()
    sample, t, context = unet_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(sample, t, encoder_hidden_states=context).sample
    out.float().square().mean().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients(models):
    unet, te = models
    spec = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, train_text_encoder=False,
                       dropout=0.1, rank_dropout=0.1, module_dropout=0.1)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(unet)
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        network = create_network(spec, model, None)
        randomize(network)
        network.apply_to()
        network.train()
        sample, t, context = unet_inputs()
        torch.manual_seed(123)
        model(sample, t, encoder_hidden_states=context).sample.square().mean().backward()
        grads.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                for p in network.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_param_groups_freeze_parts_without_lr(models):
    unet, te = models
    network = create_network(SPEC, unet, te)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("text_encoder", 5e-5), ("unet", 1e-4)]
    assert sum(p.numel() for g in groups for p in g["params"]) == network.parameter_count()
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=0)
    assert [g["name"] for g in groups] == ["unet"]
    te_params = [p for m in network.modules_of(TE) for p in m.parameters()]
    assert te_params and not any(p.requires_grad for p in te_params)


def test_resume_with_other_rank_is_a_clear_error(models):
    unet, te = models
    saved = create_network(SPEC, unet, te).kohya_state_dict()
    other = create_network(NetworkSpec(network_dim=8, network_alpha=2, conv_dim=2, conv_alpha=1), unet, te)
    with pytest.raises(NetworkFileError, match=r"has rank 4 in the file but this network was created with rank 8; set .*dim.* = 4"):
        other.load_kohya_state_dict(saved)
    other_alpha = create_network(NetworkSpec(network_dim=4, network_alpha=1, conv_dim=2, conv_alpha=1), unet, te)
    with pytest.raises(NetworkFileError, match="alpha 2 but this network uses 1"):
        other_alpha.load_kohya_state_dict(saved)
    no_conv = create_network(NetworkSpec(network_dim=4, network_alpha=2), unet, te)
    with pytest.raises(NetworkFileError, match="not part of this network"):
        no_conv.load_kohya_state_dict(saved)
    same = create_network(SPEC, unet, te)
    same.load_kohya_state_dict(saved)
    assert all(torch.equal(v, saved[k]) for k, v in same.kohya_state_dict().items())
