"""Key naming of kohya-format LoRA files: pure string functions, no torch.

A kohya module name is a prefix plus the module's dotted path inside the diffusers model with every
"." replaced by "_" (`lora_unet_mid_block_attentions_0_proj_in`). The text encoder keeps the literal
`text_model_` segment that every consumer expects, whatever transformers version built the model.
Files from other tools may name U-Net modules after the original LDM layout (`input_blocks_4_1_…`);
`to_diffusers_name` maps them onto the diffusers names we write.
"""

from __future__ import annotations

import re

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"

# The tensors one module may carry. The first three are what we write; the LyCORIS extras are read.
DOWN = "lora_down.weight"
UP = "lora_up.weight"
ALPHA = "alpha"
MID = "lora_mid.weight"
DORA_SCALE = "dora_scale"
LORA_PARTS: tuple[str, ...] = (DOWN, UP, ALPHA, MID, DORA_SCALE)

# LyCORIS' other algorithms that train_network.py writes (network_module = "lycoris.kohya") and the sampler
# reads (networks/algorithms.py): LoHa (Hadamard product of two low-rank pairs, optional Tucker cores),
# LoKr (Kronecker product, either factor optionally low-rank, optional Tucker core) and (IA)^3 (a learned
# per-channel scale of the weight).
LOHA_PARTS: tuple[str, ...] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS: tuple[str, ...] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
IA3_WEIGHT = "weight"
IA3_ON_INPUT = "on_input"
IA3_PARTS: tuple[str, ...] = (IA3_WEIGHT, IA3_ON_INPUT)
# every tensor part a supported file module may have
READABLE_PARTS: tuple[str, ...] = LORA_PARTS + LOHA_PARTS + LOKR_PARTS + IA3_PARTS

# Key suffixes of other LyCORIS / PEFT algorithms, so a user hears "GLoRA is not supported yet"
# instead of "unknown key". Keys are matched on the text after the module name's first ".".
OTHER_ALGORITHMS: dict[str, str] = {
    "lokr_t1": "LoKr with a Tucker core on its first factor (lokr_t1)",
    "diff": "full-weight difference (LyCORIS 'full')", "diff_b": "full-weight difference (LyCORIS 'full')",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "oft_blocks": "OFT", "oft_diag": "OFT", "rescale": "OFT/BOFT", "oft_R": "BOFT",
    "w_norm": "LyCORIS norm training", "b_norm": "LyCORIS norm training",
    "lora_A.weight": "PEFT/diffusers-format LoRA", "lora_B.weight": "PEFT/diffusers-format LoRA",
    "lora.down.weight": "diffusers attention-processor LoRA", "lora.up.weight": "diffusers attention-processor LoRA",
}


def unet_kohya_name(module_path: str) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return UNET_PREFIX + module_path.replace(".", "_")


def te_kohya_name(module_path: str) -> str:
    """Text-encoder module path -> kohya name, always in the `lora_te_text_model_…` form.

    transformers >= 5 dropped the `text_model` submodule of CLIPTextModel, so `named_modules()` gives
    `encoder.layers.0…`; consumers only know `text_model.encoder.layers.0…`, so the segment is added back.
    """
    path = module_path.removeprefix("text_model.")
    return TE_PREFIX + "text_model_" + path.replace(".", "_")


def split_key(key: str) -> tuple[str, str]:
    """`<module>.<tensor part>` -> (module, part). Module names never contain a dot."""
    module, _, part = key.partition(".")
    return module, part


# --- LDM (original Stable Diffusion) U-Net names -> diffusers names, in the underscore form ---------
# SD1 has two resnets per level, so input block n (n >= 1) is level (n-1)//3, slot (n-1)%3 where slot 2
# is the downsampler; output block n is level n//3, slot n%3, and its upsampler is the last element.
_RESNET_PARTS = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_INPUT = re.compile(r"^input_blocks_(\d+)_(\d+)_(.+)$")
_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_OUTPUT = re.compile(r"^output_blocks_(\d+)_(\d+)_(.+)$")


def _resnet_part(rest: str) -> str | None:
    return _RESNET_PARTS.get(rest)


def ldm_unet_to_diffusers(body: str) -> str | None:
    """Map an LDM U-Net module name (underscore form, no prefix) to the diffusers one; None if not LDM."""
    if body in _TOP_LEVEL:
        return _TOP_LEVEL[body]
    if m := _INPUT.match(body):
        n, element, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        level, slot = (n - 1) // 3, (n - 1) % 3
        if slot == 2 and element == 0 and rest == "op":
            return f"down_blocks_{level}_downsamplers_0_conv"
        if element == 0 and (part := _resnet_part(rest)):
            return f"down_blocks_{level}_resnets_{slot}_{part}"
        if element == 1:
            return f"down_blocks_{level}_attentions_{slot}_{rest}"
        return None
    if m := _MIDDLE.match(body):
        element, rest = int(m[1]), m[2]
        if element in (0, 2) and (part := _resnet_part(rest)):
            return f"mid_block_resnets_{element // 2}_{part}"
        if element == 1:
            return f"mid_block_attentions_0_{rest}"
        return None
    if m := _OUTPUT.match(body):
        n, element, rest = int(m[1]), int(m[2]), m[3]
        level, slot = n // 3, n % 3
        if element == 0 and (part := _resnet_part(rest)):
            return f"up_blocks_{level}_resnets_{slot}_{part}"
        if element in (1, 2) and rest == "conv":
            return f"up_blocks_{level}_upsamplers_0_conv"
        if element == 1:
            return f"up_blocks_{level}_attentions_{slot}_{rest}"
        return None
    return None


def to_diffusers_name(module: str) -> str:
    """Normalise one module name of any supported style to the name we write.

    - LDM-style U-Net names (`lora_unet_input_blocks_1_1_…`, `…_middle_block_…`, `…_output_blocks_…`)
    - text-encoder names written without `text_model_` (tools that used transformers >= 5 naively)
    Names already in our form, and names we cannot map, are returned unchanged (the caller reports them).
    """
    if module.startswith(UNET_PREFIX):
        body = module[len(UNET_PREFIX):]
        mapped = ldm_unet_to_diffusers(body)
        return UNET_PREFIX + mapped if mapped else module
    if module.startswith(TE_PREFIX + "encoder_layers_"):
        return TE_PREFIX + "text_model_" + module[len(TE_PREFIX):]
    return module


def is_ldm_style(module: str) -> bool:
    body = module.removeprefix(UNET_PREFIX)
    return module.startswith(UNET_PREFIX) and ldm_unet_to_diffusers(body) is not None


# --- SD1 block index (the 25 "block-wise" slots of sd-scripts) ----------------------------------------
# IN00..IN11 -> 0..11, MID -> 12, OUT00..OUT11 -> 13..24 (IN00 is conv_in, never targeted).
SD1_BLOCK_NAMES: tuple[str, ...] = tuple(
    [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
)
NUM_SD1_BLOCKS = len(SD1_BLOCK_NAMES)

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")


def unet_block_index(module_path: str) -> int | None:
    """The sd-scripts block slot (0..24) of a diffusers U-Net module path; None outside the 25 blocks."""
    if module_path.startswith("mid_block."):
        return 12
    if m := _DOWN.match(module_path):
        level, kind, j = int(m[1]), m[2], int(m[3])
        return 3 * (level + 1) if kind == "downsamplers" else 1 + 3 * level + j
    if m := _UP.match(module_path):
        level, kind, j = int(m[1]), m[2], int(m[3])
        return 13 + 3 * level + (2 if kind == "upsamplers" else j)
    return None
