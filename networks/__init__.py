"""LoRA / LoCon networks for SD1.x: the module, its kohya-format files, and tools; LyCORIS' algorithms
trained through the optional lycoris-lora package and read back by our own code.

What to train
    spec = NetworkSpec.from_args(network_dim=32, network_alpha=1,
                                 network_args={"conv_dim": "8", "conv_alpha": "4"})
        sd-scripts' `network_args` keys: conv_dim, conv_alpha, dropout, rank_dropout, module_dropout,
        block_dims, block_alphas, conv_block_dims, conv_block_alphas (25 values: IN00..IN11, MID,
        OUT00..OUT11), preset ("attention" = sd-scripts' set, "attention_qkvo" = PEFT-style q/k/v/out);
        ours: text_encoder_dim, text_encoder_alpha. Any other key -> ConfigError naming it.
        keyword-only: train_unet=True, train_text_encoder=True. `spec.to_metadata()` -> the ss_network_* keys.

The network (training loop)
    network = create_network(spec, unet, text_encoder)   # LoConNetwork: nn.Module, modules by kohya name
                                        # (LoRA weights float32 on each base layer's device; text_encoder
                                        # may be None when it is not trained)
    network.apply_to()                  # patch forwards (base weights untouched, not copied)
    network.restore()                   # un-patch
    network.set_multiplier(0.5)         # any time; 0 = off
    network.param_groups(unet_lr, text_encoder_lr)  # [{"params", "lr", "name"}]; lr None/0 freezes a part
    network.kohya_state_dict()          # {name.lora_down.weight, name.lora_up.weight, name.alpha}
    network.load_kohya_state_dict(tensors, strict=True)  # resume; any supported naming style;
                                        # rank / alpha / target mismatch -> NetworkFileError
    network.merge_to(multiplier)        # fold into the base weights (un-patches first)
    network.train() / network.eval()    # dropout variants act in train mode only
  Patched forwards are gradient-checkpoint safe (module dropout draws from the CPU RNG, which
  checkpointing restores) and compute the LoRA branch in the input's dtype, so frozen fp16/bf16 bases
  work with fp32 LoRA weights with or without autocast.

Files
    save_network(path, tensors, metadata, save_dtype="fp16", include_dataset_metadata=True) -> metadata
        atomic; float32 alpha; sshs_model_hash / sshs_legacy_hash; modelspec.* keys.
    load_network_file(path) -> (tensors, metadata)    # NetworkFileError for bad / unsupported files
    normalize_names(tensors)            # LyCORIS / LDM-style / transformers-5-style names -> ours
    sshs_hashes(tensors, metadata)      # the two hashes as readers recompute them

LyCORIS training (network_module = "lycoris.kohya"; networks/lycoris_network.py, needs lycoris-lora)
    spec = LycorisSpec.from_args(8, 4, {"algo": "loha", "conv_dim": "4"})   # every setting checked
    network = LycorisKohyaNetwork(spec, unet, text_encoder)  # the package's network, patched at once;
                                        # the same methods the trainer uses on LoConNetwork, plus
                                        # trainable_state() / load_trainable_state() for an exact resume

Using files (sampler)
    network_from_weights(tensors, unet, text_encoder, multiplier)  # a patching network for any file
    merge_weights(tensors, unet, text_encoder, multiplier)          # handles lora_mid and dora_scale
    (library/sampling/networks.py merges or patches a list of "file:multiplier" entries with these)
    Any file module may be LoRA/LoCon or LyCORIS' LoHa, LoKr, (IA)^3 (each optionally DoRA): its weight
    change is networks/algorithms.py's `effective_delta(parts, weight)`, written from the published
    formulas (the package is not needed to sample with or inspect LyCORIS files).

Tools
    python networks/check_lora.py FILE...   (or python -m networks.check_lora FILE...)
"""

from networks.apply import (
    NetworkFileArg, merge_weights, network_from_weights, parse_network_arg,
)
from networks.files import (
    DATASET_METADATA_KEYS, load_network_file, normalize_names, save_network, sshs_hashes,
    without_dataset_metadata,
)
from networks.locon import LoConModule, LoConNetwork, create_network
from networks.names import to_diffusers_name
from networks.spec import NetworkSpec

__all__ = [
    "DATASET_METADATA_KEYS",
    "LoConModule",
    "LoConNetwork",
    "NetworkFileArg",
    "NetworkSpec",
    "create_network",
    "load_network_file",
    "merge_weights",
    "network_from_weights",
    "normalize_names",
    "parse_network_arg",
    "save_network",
    "sshs_hashes",
    "to_diffusers_name",
    "without_dataset_metadata",
]
