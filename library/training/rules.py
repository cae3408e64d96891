"""Rules between the keys of a training job, applied once by the job loader (library/config.py).

Each rule takes the resolved values, the keys the user set, the typed datasets and the job's source (for
messages); it raises ConfigError or returns the datasets as the script will train them. Nothing after the
loader checks keys against each other again.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

from library.errors import ConfigError
from library.schema import parse_key_values
from library.training.fields import NETWORK_FIELDS

LORA_ONLY_KEYS = tuple(k for k in NETWORK_FIELDS if k.startswith("network_"))

log = logging.getLogger("pentadactyl")


def noise_rules(values: Mapping[str, Any], source: str) -> None:
    """The noise keys of every training script: adaptive_noise_scale scales noise_offset (sd-scripts refuses it
    alone)."""
    if values["adaptive_noise_scale"] and not values["noise_offset"]:
        raise ConfigError(f"{source}: adaptive_noise_scale = {values['adaptive_noise_scale']} adds to noise_offset, "
                          "which is 0; set noise_offset (e.g. 0.05) too, or remove adaptive_noise_scale.")


def textual_inversion_rules(values: Mapping[str, Any], given: frozenset[str], datasets: list, source: str) -> list:
    noise_rules(values, source)
    if values["use_object_template"] and values["use_style_template"]:
        raise ConfigError(f"{source}: use_object_template and use_style_template exclude each other; set one of them.")
    contrast_keys = [k for k in ("contrastive_margin", "contrastive_weight") if k in given]
    if contrast_keys and not values["contrastive_data_dir"]:
        raise ConfigError(f"{source}: {', '.join(contrast_keys)} set without contrastive_data_dir; add "
                          "contrastive_data_dir = \"folder of good images\" or remove the key(s).")
    return datasets


def network_args_of(network_args: list[str] | None, network_dropout: float | None, where: str) -> dict[str, str]:
    """network_args as settings, with network_dropout as their `dropout` unless they set one."""
    args = parse_key_values(network_args, where)
    if network_dropout is not None:
        args.setdefault("dropout", str(network_dropout))
    return args


def network_rules(values: Mapping[str, Any], given: frozenset[str], datasets: list, source: str) -> list:
    """The LoRA keys between themselves: network_args well-formed (for lycoris.kohya every LyCORIS setting
    checked), networks.locon with its convolution rank, at most one of the two "train only" switches."""
    noise_rules(values, source)
    args = network_args_of(values["network_args"], values.get("network_dropout"), f"{source}: network_args")
    if values["network_module"] == "lycoris.kohya":  # networks.lycoris_network.LYCORIS_MODULE (not imported: torch)
        from networks.lycoris_network import parse_lycoris_args

        try:
            parse_lycoris_args(args)  # the settings only; whether the package is installed: before training
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    elif "algo" in args:
        raise ConfigError(f"{source}: network_args has algo = {args['algo']}, a LyCORIS setting, but network_module = "
                          f"\"{values['network_module']}\"; set network_module = \"lycoris.kohya\" (pip install "
                          "lycoris-lora) to train LyCORIS' algorithms, or remove algo.")
    if values["network_module"] == "networks.locon" and "conv_dim" not in args:
        raise ConfigError(f"{source}: network_module = \"networks.locon\" adapts the convolution layers too, but "
                          "network_args has no conv_dim; add network_args = [\"conv_dim=8\", \"conv_alpha=4\"], or use "
                          "network_module = \"networks.lora\" for attention layers only.")
    if values["network_train_unet_only"] and values["network_train_text_encoder_only"]:
        raise ConfigError(f"{source}: network_train_unet_only and network_train_text_encoder_only "
                          "exclude each other; set at most one.")
    return datasets


def reg_subsets(datasets: list | None) -> list:
    """(dataset config, subset config) of every is_reg subset."""
    return [(ds, sub) for ds in datasets or [] for sub in ds.subsets if sub.is_reg]


def class_folder_name(prompt: str) -> str:
    """Folder-mode sub-folder for generated class images: '1_' + the prompt, made safe as a file name."""
    safe = "".join(c if c.isalnum() or c in " -_," else "_" for c in prompt).strip(" .") or "class"
    return f"1_{safe[:80]}"


def create_class_folder_for_folder_mode(values: Mapping[str, Any]) -> None:
    """Folder mode reads reg_data_dir's N_concept sub-folders. When the job asks for generated class images
    and reg_data_dir is missing or empty, make reg_data_dir/1_<class_prompt> for them first."""
    reg, wanted, prompt = values["reg_data_dir"], values["num_class_images"], values["class_prompt"]
    if not (values["train_data_dir"] and reg and wanted and prompt and prompt.strip()):
        return
    folder = Path(reg).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        return
    target = folder / class_folder_name(prompt)
    target.mkdir(parents=True, exist_ok=True)
    log.info(f"created {target} for the generated class images (reg_data_dir folder mode)")


def dreambooth_rules(values: Mapping[str, Any], given: frozenset[str], datasets: list, source: str) -> list:
    """Full mode takes no LoRA keys; generated class images need a reg subset and a prompt. Class images
    without a caption file are captioned with class_prompt (a reg subset's own class_tokens win)."""
    noise_rules(values, source)
    if values["dreambooth_mode"] == "full":
        lora_keys = sorted(k for k in LORA_ONLY_KEYS if k in given)
        if lora_keys:
            raise ConfigError(f"{source}: {', '.join(lora_keys)} set LoRA options, but dreambooth_mode = \"full\" "
                              "fine-tunes the whole U-Net; remove them, or set dreambooth_mode = \"lora\". "
                              "(unet_lr / text_encoder_lr apply to both modes.)")
    else:
        datasets = network_rules(values, given, datasets, source)
    class_prompt = values["class_prompt"]
    if values["num_class_images"]:
        regs = reg_subsets(datasets)
        if not regs:
            raise ConfigError(f"{source}: num_class_images = {values['num_class_images']}, but no subset has "
                              "is_reg = true. Add a [[datasets.subsets]] with image_dir = \"class_images\" and "
                              "is_reg = true (or reg_data_dir in folder mode), or set num_class_images = 0.")
        for _, sub in regs:
            if not (class_prompt or sub.class_tokens):
                raise ConfigError(f"{sub.where}: class images are to be generated but there is no prompt for them; "
                                  "set class_prompt = \"a photo of hand\" (or class_tokens on this subset).")
        from library.sampling.schedulers import resolve_sampler

        resolve_sampler(values["class_image_sampler"], f"{source}: class_image_sampler")
    if not class_prompt or datasets is None:
        return datasets
    return [dataclasses.replace(ds, subsets=tuple(
        dataclasses.replace(sub, class_tokens=class_prompt) if sub.is_reg and sub.class_tokens is None else sub
        for sub in ds.subsets)) for ds in datasets]
