"""Key naming, target selection and NetworkSpec parsing, checked against independently written lists."""

from __future__ import annotations

import pytest

from library.errors import ConfigError
from library.models.architecture import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, build_text_encoder, build_unet
from networks import NetworkSpec, create_network, to_diffusers_name
from networks.names import SD1_BLOCK_NAMES, te_kohya_name, unet_block_index
from networks.targets import TE, UNET_ATTENTION, UNET_CONV, sd15_layer_table


@pytest.fixture(scope="module")
def sd15():
    return build_unet(SD15_UNET_CONFIG, empty=True), build_text_encoder(SD15_TEXT_CONFIG, empty=True)


# --- the expected names, written out from the SD1.5 block layout (not derived from our code) ----------
TRANSFORMERS = (
    [f"down_blocks_{i}_attentions_{j}" for i in range(3) for j in range(2)]
    + ["mid_block_attentions_0"]
    + [f"up_blocks_{i}_attentions_{j}" for i in (1, 2, 3) for j in range(3)]
)
TRANSFORMER_LAYERS = (
    ["proj_in", "proj_out", "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"]
    + [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
)
QKVO_LAYERS = [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
RESNETS = (
    [f"down_blocks_{i}_resnets_{j}" for i in range(4) for j in range(2)]
    + [f"mid_block_resnets_{j}" for j in range(2)]
    + [f"up_blocks_{i}_resnets_{j}" for i in range(4) for j in range(3)]
)
# a resnet has a 1x1 shortcut where its input width differs from its output: the first resnet of
# down levels 1 and 2 (320->640, 640->1280) and every up resnet (skip connections are concatenated)
SHORTCUTS = ["down_blocks_1_resnets_0", "down_blocks_2_resnets_0"] + [r for r in RESNETS if r.startswith("up_")]
SAMPLERS = [f"down_blocks_{i}_downsamplers_0_conv" for i in range(3)] + [f"up_blocks_{i}_upsamplers_0_conv" for i in range(3)]

EXPECTED_ATTENTION = {f"lora_unet_{t}_{l}" for t in TRANSFORMERS for l in TRANSFORMER_LAYERS}
EXPECTED_QKVO = {f"lora_unet_{t}_{l}" for t in TRANSFORMERS for l in QKVO_LAYERS}
EXPECTED_CONV = (
    {f"lora_unet_{r}_{c}" for r in RESNETS for c in ("conv1", "conv2", "time_emb_proj")}
    | {f"lora_unet_{r}_conv_shortcut" for r in SHORTCUTS}
    | {f"lora_unet_{s}" for s in SAMPLERS}
)
TE_LAYERS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
EXPECTED_TE = {f"lora_te_text_model_encoder_layers_{i}_{l}" for i in range(12) for l in TE_LAYERS}


def names_by_part(network):
    parts: dict[str, set[str]] = {}
    for name in network.names():
        parts.setdefault(network[name].target.part, set()).add(name)
    return parts


def test_default_set_matches_expected_names_and_counts(sd15):
    unet, te = sd15
    network = create_network(NetworkSpec(network_dim=4, conv_dim=2), unet, te)
    parts = names_by_part(network)
    assert parts[UNET_ATTENTION] == EXPECTED_ATTENTION and len(EXPECTED_ATTENTION) == 192
    assert parts[UNET_CONV] == EXPECTED_CONV and len(EXPECTED_CONV) == 86
    assert parts[TE] == EXPECTED_TE and len(EXPECTED_TE) == 72


def test_formats_md_examples_are_produced(sd15):
    network = create_network(NetworkSpec(network_dim=4, conv_dim=2), *sd15)
    names = set(network.names())
    for example in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_up_blocks_1_resnets_2_conv1",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
    ):
        assert example in names
    # transformers >= 5 paths have no `text_model.`; the naive name must never appear
    assert not any(n.startswith("lora_te_encoder_") for n in names)


def test_te_name_is_literal_with_or_without_text_model_level():
    assert te_kohya_name("encoder.layers.3.mlp.fc1") == "lora_te_text_model_encoder_layers_3_mlp_fc1"
    assert te_kohya_name("text_model.encoder.layers.3.mlp.fc1") == "lora_te_text_model_encoder_layers_3_mlp_fc1"


def test_qkvo_preset_and_part_switches(sd15):
    unet, te = sd15
    network = create_network(NetworkSpec(network_dim=4, preset="attention_qkvo"), unet, te)
    parts = names_by_part(network)
    assert parts[UNET_ATTENTION] == EXPECTED_QKVO and len(EXPECTED_QKVO) == 128
    assert parts[TE] == {n for n in EXPECTED_TE if "self_attn" in n}
    unet_only = create_network(NetworkSpec(network_dim=4, train_text_encoder=False), unet, te)
    assert set(unet_only.names()) == EXPECTED_ATTENTION
    te_only = create_network(NetworkSpec(network_dim=4, train_unet=False), unet, te)
    assert set(te_only.names()) == EXPECTED_TE


def test_ranks_and_alphas_per_kind(sd15):
    spec = NetworkSpec(network_dim=32, network_alpha=1, conv_dim=8, conv_alpha=4, text_encoder_dim=16,
                       text_encoder_alpha=2)
    network = create_network(spec, *sd15)
    def ra(name):
        module = network[name]
        return module.rank, module.alpha
    assert ra("lora_unet_up_blocks_1_resnets_2_conv1") == (8, 4.0)  # 3x3 -> conv numbers
    assert ra("lora_unet_up_blocks_1_resnets_2_conv_shortcut") == (32, 1.0)  # 1x1 -> linear numbers
    assert ra("lora_unet_up_blocks_1_resnets_2_time_emb_proj") == (32, 1.0)
    assert ra("lora_unet_mid_block_attentions_0_proj_in") == (32, 1.0)
    assert ra("lora_te_text_model_encoder_layers_0_mlp_fc1") == (16, 2.0)
    shapes = network.kohya_state_dict()
    assert tuple(shapes["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape) == (8, 320, 3, 3)
    assert tuple(shapes["lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight"].shape) == (320, 8, 1, 1)
    assert tuple(shapes["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape) == (32, 1280, 1, 1)


def test_block_dims_express_rank_200_linear_rank_1_conv(sd15):
    # the third-party layout of the study: rank 200 on linears, rank 1 on (some) convolutions
    conv_dims = [0] * 13 + [1] * 12  # convs only in the output blocks
    spec = NetworkSpec.from_args(200, 200, {"block_dims": ",".join(["200"] * 25),
                                            "conv_block_dims": conv_dims, "conv_alpha": "1"})
    network = create_network(spec, *sd15)
    convs = [network[n] for n in network.names() if network[n].target.kind == "conv"]
    assert convs and all(m.rank == 1 and m.target.block >= 13 for m in convs)
    assert all(network[n].rank == 200 for n in network.names() if network[n].target.kind != "conv")
    # a zero block dim leaves that block out
    spec = NetworkSpec.from_args(4, 4, {"block_dims": [0] * 12 + [4] * 13})
    network = create_network(spec, sd15[0], None)
    assert all(network[n].target.block >= 12 for n in network.names())


def test_block_index_against_ldm_numbering():
    # independent route: the LDM name says the block (input_blocks_N -> N, middle -> 12, output_blocks_N -> 13+N)
    cases = {
        "lora_unet_input_blocks_1_1_proj_in": 1, "lora_unet_input_blocks_2_0_in_layers_2": 2,
        "lora_unet_input_blocks_3_0_op": 3, "lora_unet_input_blocks_4_0_skip_connection": 4,
        "lora_unet_input_blocks_9_0_op": 9, "lora_unet_input_blocks_11_0_out_layers_3": 11,
        "lora_unet_middle_block_1_proj_out": 12, "lora_unet_middle_block_2_emb_layers_1": 12,
        "lora_unet_output_blocks_0_0_in_layers_2": 13, "lora_unet_output_blocks_2_1_conv": 15,
        "lora_unet_output_blocks_5_2_conv": 18, "lora_unet_output_blocks_5_1_proj_in": 18,
        "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_k": 24,
    }
    table = sd15_layer_table()
    for ldm, block in cases.items():
        assert unet_block_index(table[to_diffusers_name(ldm)].path) == block, ldm
    assert SD1_BLOCK_NAMES[0] == "IN00" and SD1_BLOCK_NAMES[12] == "MID" and SD1_BLOCK_NAMES[24] == "OUT11"


def test_ldm_names_map_onto_diffusers_names():
    pairs = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_3_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_input_blocks_4_0_skip_connection": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_input_blocks_5_0_emb_layers_1": "lora_unet_down_blocks_1_resnets_1_time_emb_proj",
        "lora_unet_middle_block_0_in_layers_2": "lora_unet_mid_block_resnets_0_conv1",
        "lora_unet_middle_block_1_proj_out": "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_middle_block_2_out_layers_3": "lora_unet_mid_block_resnets_1_conv2",
        "lora_unet_output_blocks_2_1_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_output_blocks_5_2_conv": "lora_unet_up_blocks_1_upsamplers_0_conv",
        "lora_unet_output_blocks_5_1_proj_in": "lora_unet_up_blocks_1_attentions_2_proj_in",
        "lora_unet_output_blocks_11_0_out_layers_3": "lora_unet_up_blocks_3_resnets_2_conv2",
        "lora_unet_output_blocks_6_1_transformer_blocks_0_ff_net_0_proj":
            "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_te_encoder_layers_0_mlp_fc1": "lora_te_text_model_encoder_layers_0_mlp_fc1",
        # already ours: unchanged
        "lora_unet_up_blocks_1_resnets_2_conv1": "lora_unet_up_blocks_1_resnets_2_conv1",
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "lora_te_text_model_encoder_layers_0_mlp_fc1",
    }
    for ldm, ours in pairs.items():
        assert to_diffusers_name(ldm) == ours, ldm


def test_spec_from_args_accepts_sd_scripts_keys_and_rejects_others():
    spec = NetworkSpec.from_args(32, 1, {"conv_dim": "8", "conv_alpha": "4", "dropout": "0.1",
                                         "rank_dropout": 0.2, "module_dropout": "0.05"})
    assert (spec.conv_dim, spec.conv_alpha, spec.dropout, spec.rank_dropout, spec.module_dropout) == (8, 4.0, 0.1, 0.2, 0.05)
    assert spec.te_dim == 32 and spec.te_alpha == 1.0
    meta = spec.to_metadata()
    assert meta["ss_network_dim"] == "32" and meta["ss_network_alpha"] == "1"
    assert '"conv_dim": "8"' in meta["ss_network_args"]
    with pytest.raises(ConfigError, match="algo"):
        NetworkSpec.from_args(32, 1, {"algo": "loha"})
    with pytest.raises(ConfigError, match="conv_dim"):
        NetworkSpec.from_args(32, 1, {"conv_dim": "eight"})
    with pytest.raises(ConfigError, match="block_dims has 3 values"):
        NetworkSpec.from_args(32, 1, {"block_dims": "1,2,3"})
    with pytest.raises(ConfigError, match="preset"):
        NetworkSpec.from_args(32, 1, {"preset": "full"})
    with pytest.raises(ConfigError, match="rank_dropout"):
        NetworkSpec.from_args(32, 1, {"rank_dropout": "1.5"})
