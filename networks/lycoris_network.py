"""LyCORIS networks for train_network.py, through the lycoris-lora package (an optional extra).

sd-scripts' jobs say `network_module = "lycoris.kohya"` and `network_args = ["algo=loha", "conv_dim=4", …]`;
this module reads those settings (`LycorisSpec`: checked once, before the model loads, every bad value named
with the valid ones) and builds the network with the package's kohya entry point
(`lycoris.kohya.create_network`, then its `apply_to`, `prepare_optimizer_params`, `state_dict` and
`load_state_dict`). The package does the training; what it saves is renamed to the kohya names every reader
expects (the text encoder's `lora_te_text_model_encoder_layers_…`, whatever transformers version built the
model). Reading the files back (sample.py, check_lora.py, merging) does not use the package: see
networks/algorithms.py.

    spec = LycorisSpec.from_args(network_dim=8, network_alpha=4, network_args={"algo": "loha"})
    network = LycorisKohyaNetwork(spec, unet, text_encoder)   # nn.Module; patched at once (identity at start)
    network.param_groups(unet_lr, text_encoder_lr)             # [{"params", "lr", "name"}]
    network.kohya_state_dict()                                 # the file's tensors, kohya names
    network.trainable_state() / network.load_trainable_state(state)   # exact resume
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from library.errors import ConfigError, NetworkFileError
from networks.names import ALPHA, IA3_ON_INPUT, split_key, to_diffusers_name
from networks.spec import _number_text

LYCORIS_MODULE = "lycoris.kohya"
PACKAGE = "lycoris-lora"

# algo values whose files the sampler and the tools can read (networks/algorithms.py), with their names
ALGORITHMS: dict[str, str] = {"lora": "LoRA/LoCon", "locon": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr",
                              "ia3": "(IA)^3"}
# the package's other algorithms: trainable there, but nothing here could apply what they save
UNREADABLE_ALGORITHMS = ("full", "dylora", "glora", "diag-oft", "boft", "tlora")
# the package's built-in presets (lycoris.config.PRESET); a preset may also be a .toml file
BUILTIN_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")

_COMMON_KEYS = ("algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
                "bypass_mode")
_LOW_RANK_KEYS = ("use_tucker", "use_scalar", "dora_wd", "wd_on_output", "rs_lora")
_LOKR_KEYS = ("factor", "decompose_both", "full_matrix", "unbalanced_factorization")
KEYS_BY_ALGORITHM: dict[str, tuple[str, ...]] = {
    "lora": _COMMON_KEYS + _LOW_RANK_KEYS,
    "locon": _COMMON_KEYS + _LOW_RANK_KEYS,
    "loha": _COMMON_KEYS + _LOW_RANK_KEYS,
    "lokr": _COMMON_KEYS + _LOW_RANK_KEYS + _LOKR_KEYS,
    "ia3": _COMMON_KEYS,
}
ALL_KEYS = tuple(dict.fromkeys(k for keys in KEYS_BY_ALGORITHM.values() for k in keys))
# the package's old spellings of use_tucker (disable_conv_cp says the opposite)
_TUCKER_ALIASES = ("use_cp", "use_conv_cp", "disable_conv_cp")
_BOOL_KEYS = _LOW_RANK_KEYS + ("bypass_mode", "decompose_both", "full_matrix", "unbalanced_factorization")
_REFUSED: dict[str, str] = {
    "train_norm": "trains the norm layers (w_norm/b_norm tensors), which sample.py and the tools cannot apply",
    "loraplus_lr_ratio": "LoRA+ learning-rate ratios are not supported with lycoris.kohya yet",
    "loraplus_unet_lr_ratio": "LoRA+ learning-rate ratios are not supported with lycoris.kohya yet",
    "loraplus_text_encoder_lr_ratio": "LoRA+ learning-rate ratios are not supported with lycoris.kohya yet",
    "constraint": "belongs to LyCORIS' OFT algorithms, which are not supported",
    "rescaled": "belongs to LyCORIS' OFT algorithms, which are not supported",
    "block_size": "belongs to LyCORIS' OFT algorithms, which are not supported",
}
_OURS = ("text_encoder_dim", "text_encoder_alpha", "block_dims", "block_alphas", "conv_block_dims",
         "conv_block_alphas")

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def package_missing_message() -> str:
    return (f"network_module = \"{LYCORIS_MODULE}\" trains LyCORIS' algorithms through the {PACKAGE} package, "
            f"which is not installed: pip install {PACKAGE} (into this environment: .venv/bin/pip install "
            f"{PACKAGE}), or use network_module = \"networks.lora\".")


def require_lycoris():
    """lycoris.kohya, or a ConfigError that says how to install it."""
    try:
        import lycoris.kohya as kohya
    except ImportError:
        raise ConfigError(package_missing_message()) from None
    return kohya


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"network_args: {key} = {value!r} is not true or false; write {key}=True or {key}=False")


def _number(key: str, value: Any, kind: type, minimum: float | None = None) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"network_args: {key} = {value!r} is not a number") from None
    if kind is int:
        if number != int(number):
            raise ConfigError(f"network_args: {key} = {value!r} must be a whole number")
        number = int(number)
    if minimum is not None and number < minimum:
        raise ConfigError(f"network_args: {key} = {value!r} must be at least {minimum:g}")
    return number


def parse_lycoris_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts-style `network_args` for lycoris.kohya -> the keyword arguments given to the package.

    Every key is checked here (the package ignores unknown ones and reads some values oddly, e.g. the text
    "False" as true in an alias), and only clean Python values reach it. ConfigError names the key and the
    valid values."""
    values = dict(args)
    algo = str(values.pop("algo", "lora")).strip().lower()
    if algo in UNREADABLE_ALGORITHMS:
        raise ConfigError(f"network_args: algo = {algo!r} is a LyCORIS algorithm whose files sample.py and the "
                          f"tools cannot apply; use one of {', '.join(ALGORITHMS)}")
    if algo not in ALGORITHMS:
        raise ConfigError(f"network_args: algo = {algo!r} is unknown; use one of {', '.join(ALGORITHMS)} "
                          "(DoRA: algo=lora with dora_wd=True)")
    out: dict[str, Any] = {"algo": algo}
    aliases = [k for k in _TUCKER_ALIASES if k in values]
    if (aliases and "use_tucker" in values) or len(aliases) > 1:
        raise ConfigError(f"network_args: {', '.join(aliases + [k for k in ('use_tucker',) if k in values])} "
                          "say the same thing twice; keep only use_tucker")
    for alias in aliases:
        wanted = _bool(alias, values.pop(alias))
        values["use_tucker"] = not wanted if alias == "disable_conv_cp" else wanted
    allowed = KEYS_BY_ALGORITHM[algo]
    for key, value in values.items():
        if key in _REFUSED:
            raise ConfigError(f"network_args: {key} {_REFUSED[key]}; remove it")
        if key in _OURS:
            raise ConfigError(f"network_args: {key} is a setting of networks.lora, which LyCORIS does not have; "
                              f"remove it (lycoris.kohya takes {', '.join(ALL_KEYS)})")
        if key not in ALL_KEYS:
            raise ConfigError(f"network_args: unknown key {key!r} for {LYCORIS_MODULE}; its keys are "
                              f"{', '.join(ALL_KEYS)}")
        if key not in allowed:
            users = [a for a, keys in KEYS_BY_ALGORITHM.items() if key in keys and a != "locon"]
            raise ConfigError(f"network_args: {key} has no effect with algo = {algo} (it applies to "
                              f"algo = {' / '.join(users)}); remove it")
        if key in _BOOL_KEYS:
            out[key] = _bool(key, value)
        elif key == "conv_dim":
            out[key] = _number(key, value, int, 1)
        elif key == "factor":
            out[key] = _number(key, value, int)
            if out[key] == 0 or out[key] < -1:
                raise ConfigError(f"network_args: factor = {value!r} must be -1 (automatic) or a positive "
                                  "whole number such as 8")
        elif key == "preset":
            out[key] = _preset(str(value))
        else:
            out[key] = _number(key, value, float, 0)
            if key != "conv_alpha" and out[key] >= 1:
                raise ConfigError(f"network_args: {key} = {value!r} must be in [0, 1), e.g. 0.1")
    _check_combinations(out)
    return out


def _preset(value: str) -> str:
    if value in BUILTIN_PRESETS:
        return value
    if value in ("attention", "attention_qkvo"):
        raise ConfigError(f"network_args: preset = {value!r} is a networks.lora preset; LyCORIS' presets are "
                          f"{', '.join(BUILTIN_PRESETS)} or a preset .toml file")
    if value.lower().endswith(".toml"):
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"network_args: preset = {value!r}: no such file")
        return str(Path(value).expanduser())
    raise ConfigError(f"network_args: preset = {value!r} is unknown; use one of {', '.join(BUILTIN_PRESETS)} "
                      "or the path of a LyCORIS preset .toml file")


def _check_combinations(args: Mapping[str, Any]) -> None:
    algo, bypass = args["algo"], args.get("bypass_mode", False)
    if args.get("dropout") and algo == "ia3":
        raise ConfigError("network_args: dropout (network_dropout) has no effect with algo = ia3; remove it")
    if args.get("rank_dropout") and algo == "ia3":
        raise ConfigError("network_args: rank_dropout has no effect with algo = ia3; remove it")
    if args.get("dropout") and not bypass:
        raise ConfigError("network_args: dropout (network_dropout) acts only with bypass_mode=True in LyCORIS "
                          "(its default computes the weight change and drops nothing); add \"bypass_mode=True\", "
                          "or use rank_dropout / module_dropout, or remove it")
    if args.get("dora_wd") and bypass:
        raise ConfigError("network_args: dora_wd=True with bypass_mode=True trains without DoRA's normalisation "
                          "(LyCORIS' bypass path skips it) but saves a dora_scale; remove one of them")
    if "wd_on_output" in args and not args.get("dora_wd"):
        raise ConfigError("network_args: wd_on_output applies to DoRA only; add dora_wd=True or remove it")


@dataclass(frozen=True)
class LycorisSpec:
    """What a lycoris.kohya network trains: the package's settings, checked (see `parse_lycoris_args`)."""

    network_dim: int
    network_alpha: float
    args: Mapping[str, Any]  # the package's keyword arguments (clean Python values)
    train_unet: bool = True
    train_text_encoder: bool = True
    network_args: Mapping[str, str] = field(default_factory=dict, compare=False)  # as written, for metadata

    @classmethod
    def from_args(cls, network_dim: int, network_alpha: float | None, network_args: Mapping[str, Any] | None,
                  *, train_unet: bool = True, train_text_encoder: bool = True) -> "LycorisSpec":
        raw = {k: str(v) for k, v in (network_args or {}).items()}
        if not train_unet and not train_text_encoder:
            raise ConfigError("the network trains neither the U-Net nor the text encoder; enable at least one")
        alpha = float(network_dim if network_alpha is None else network_alpha)
        return cls(int(network_dim), alpha, parse_lycoris_args(raw), train_unet, train_text_encoder,
                   {"algo": "lora", **raw})

    @property
    def algo(self) -> str:
        return self.args["algo"]

    @property
    def title(self) -> str:
        name = ALGORITHMS[self.algo]
        return ("DoRA " if self.args.get("dora_wd") else "") + name

    def to_metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": LYCORIS_MODULE,
            "ss_network_dim": str(self.network_dim),
            "ss_network_alpha": _number_text(self.network_alpha),
            "ss_network_args": json.dumps(dict(self.network_args)),
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
        }


# --- the package's network ------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_package() -> Iterator[None]:
    """The package logs every setting at INFO on stdout, and a warning that recommends its ia3 preset with
    algo=ia3 (a choice, not a problem); our log says what trains, errors still show."""
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _preset_argument(preset: str, folder: Path) -> str:
    """The preset to give the package: its own name, or for two of lycoris-lora 4.1.3's built-in presets the
    same selection written as a preset file (in `folder`), since on an SD1 model
    - the U-Net presets list the class TimestepEmbedding (added for other models) and also the names
      `time_embedding.linear_1/2`, so the time embedding is selected twice and the package stops
      ("duplicated lora name"): the file leaves the class out, the names select those layers once;
    - the ia3 preset's layer names (to_k, to_v, ff.net.2; k_proj, v_proj, mlp.fc2, the last of each on the
      input side) are matched from the start of the module path, so they select nothing: the file matches
      them at its end (`*.to_k`)."""
    if preset not in BUILTIN_PRESETS:
        return preset
    from lycoris.config import PRESET

    config = {key: value for key, value in PRESET[preset].items()}
    classes = list(config.get("unet_target_module", []))
    names = config.get("unet_target_name", [])
    changed = False
    if "TimestepEmbedding" in classes and any(n.startswith("time_embedding.") for n in names):
        config["unet_target_module"] = [c for c in classes if c != "TimestepEmbedding"]
        changed = True
    if preset == "ia3" and not config.get("use_fnmatch"):
        for key in ("unet_target_name", "text_encoder_target_name"):
            config[key] = [f"*.{n}" for n in config.get(key, [])]
        config["name_algo_map"] = {f"*.{n}": options for n, options in config.get("name_algo_map", {}).items()}
        config["use_fnmatch"] = True
        changed = True
    if not changed:
        return preset
    import toml

    path = folder / f"{preset}-sd1.toml"
    path.write_text(toml.dumps(config), encoding="utf-8")
    return str(path)


class LycorisKohyaNetwork(nn.Module):
    """The package's network (`self.lycoris`), created and patched into the models at once; every update
    starts at zero, so the models are unchanged until it trains."""

    def __init__(self, spec: LycorisSpec, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module | None = None):
        super().__init__()
        kohya = require_lycoris()
        self.spec = spec
        kwargs = {k: v for k, v in spec.args.items() if k != "preset"}
        with tempfile.TemporaryDirectory() as folder, _quiet_package():
            preset = _preset_argument(spec.args.get("preset", "full"), Path(folder))
            try:
                network = kohya.create_network(1.0, spec.network_dim, spec.network_alpha, vae, text_encoder,
                                               unet, warn_on_unmatched=False, preset=preset, **kwargs)
            except (AssertionError, ValueError, TypeError, KeyError, RuntimeError) as error:
                detail = str(error) or type(error).__name__
                if preset == spec.args.get("preset") and preset not in BUILTIN_PRESETS:
                    detail += f"; is {preset} a LyCORIS preset file it can read?"
                raise ConfigError(f"network_args: {PACKAGE} refused these settings ({detail}); "
                                  f"network_args = {json.dumps(dict(spec.network_args))}") from None
            network.apply_to(text_encoder, unet, apply_text_encoder=spec.train_text_encoder,
                             apply_unet=spec.train_unet)
        self.lycoris = network
        self._applied = True
        if not network.loras:
            parts = " and ".join(p for p, on in (("U-Net", spec.train_unet), ("text encoder", spec.train_text_encoder))
                                 if on)
            raise ConfigError(f"network_args: preset = {spec.args.get('preset', 'full')!r} selects no layer of this "
                              f"SD1 model's {parts}; use a preset that does ({', '.join(BUILTIN_PRESETS)})")
        if spec.args.get("dora_wd") and spec.args.get("wd_on_output", True):
            logging.getLogger("pentadactyl").warning(
                "DoRA with LyCORIS' default wd_on_output=True stores dora_scale per output row; AUTOMATIC1111 "
                "reads it per input column and ComfyUI normalises that case differently, so for files meant for "
                "them add \"wd_on_output=False\" to network_args (sample.py reads both).")
        # our kohya name (what the file says) of every package module, and back
        self.kohya_names = {lora.lora_name: to_diffusers_name(lora.lora_name) for lora in network.loras}
        self.package_names = {ours: theirs for theirs, ours in self.kohya_names.items()}

    # --- what the loop and the method use ---------------------------------------------------------------
    @property
    def module_count(self) -> int:
        return len(self.lycoris.loras)

    def module_counts(self) -> dict[str, int]:
        """Modules per model part and algorithm class, for the log."""
        counts: dict[str, int] = {}
        for part, loras in (("text encoder", self.lycoris.text_encoder_loras), ("U-Net", self.lycoris.unet_loras)):
            if loras:
                counts[part] = len(loras)
        return counts

    def apply_to(self) -> None:
        if not self._applied:
            for lora in self.lycoris.loras:
                lora.apply_to()
            self._applied = True

    def restore(self) -> None:
        if self._applied:
            self.lycoris.restore()
            self._applied = False

    def set_multiplier(self, multiplier: float) -> None:
        """0 un-patches the models (exactly the base model: the package's DoRA would still show W + ΔW at its
        multiplier 0), any other value patches them again."""
        self.lycoris.set_multiplier(float(multiplier))
        if multiplier == 0:
            self.restore()
        else:
            self.apply_to()

    def param_groups(self, unet_lr: float | None, text_encoder_lr: float | None) -> list[dict[str, Any]]:
        """The package's groups (prepare_optimizer_params), named as the loop names them."""
        result = self.lycoris.prepare_optimizer_params(text_encoder_lr=text_encoder_lr or None,
                                                       unet_lr=unet_lr or None, learning_rate=None)
        groups, descriptions = result if isinstance(result, tuple) else (result, [""] * len(result))
        named = []
        for group, description in zip(groups, descriptions):
            name = "text_encoder" if str(description).startswith("textencoder") else "unet"
            named.append({**group, "params": list(group["params"]), "name": name})
        return named

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor as the package holds it (its scalars included: scale_weight_norms scales
        those), by stable names."""
        state = dict(self.lycoris.named_parameters())
        state.update({name: buffer for name, buffer in self.lycoris.named_buffers() if name.endswith(".scalar")})
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = self.trainable_state()
        if set(state) != set(mine) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in mine.items()):
            raise ConfigError("resume: the training state does not hold this job's LyCORIS modules (it was written "
                              "with another algo, preset, network_dim, conv_dim or trained parts); resume with the "
                              "settings the state was saved with.")
        for key, value in state.items():
            mine[key].copy_(value)

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """The package's saved tensors, with kohya names."""
        return {self._named(key): value.detach() for key, value in self.lycoris.state_dict().items()}

    @torch.no_grad()
    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True,
                              source: str = "the network file") -> None:
        """Continue from a file (network_weights): the same modules, shapes and alphas as this network."""
        renamed: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            module, part = split_key(key)
            ours = to_diffusers_name(module)
            renamed[f"{self.package_names.get(ours, ours)}.{part}"] = value
        mine = self.lycoris.state_dict()
        file_modules = {split_key(k)[0] for k in renamed}
        own_modules = {split_key(k)[0] for k in mine}
        unknown, missing = sorted(file_modules - own_modules), sorted(own_modules - file_modules)
        if unknown or missing:
            which = (f"{len(unknown)} of its module(s) are not part of this network, e.g. "
                     f"{self.kohya_names.get(unknown[0], unknown[0])}" if unknown else
                     f"{len(missing)} module(s) of this network are missing from it, e.g. "
                     f"{self.kohya_names.get(missing[0], missing[0])}")
            raise NetworkFileError(f"{source}: {which}; it was trained with other settings (algo, preset, "
                                   "conv_dim, trained parts). Match the job's network settings to the file.")
        wrong = sorted(set(renamed) ^ set(mine))
        if wrong:
            raise NetworkFileError(f"{source}: {self._named(wrong[0])} "
                                   f"{'is not' if wrong[0] in renamed else 'is missing'} in this network's "
                                   "modules: the file was trained with another algo, factor or use_tucker setting")
        for key, value in renamed.items():
            own = mine[key]
            name = self._named(key)
            if tuple(value.shape) != tuple(own.shape):
                raise NetworkFileError(f"{source}: {name} has shape {list(value.shape)} in the file but "
                                       f"{list(own.shape)} in this network; set network_dim / conv_dim / factor "
                                       "as the file was trained, or start without it")
            part = split_key(key)[1]
            if part in (ALPHA, IA3_ON_INPUT) and not math.isclose(float(value), float(own), rel_tol=1e-6,
                                                                   abs_tol=1e-6):
                setting = "network_alpha (or conv_alpha)" if part == ALPHA else "preset"
                raise NetworkFileError(f"{source}: {name} is {float(value):g} in the file but {float(own):g} in "
                                       f"this network; set {setting} as the file was trained to continue it")
        try:
            self.lycoris.load_state_dict(renamed, strict=True)
        except RuntimeError as error:
            raise NetworkFileError(f"{source}: does not fit this network ({error})") from None

    def _named(self, key: str) -> str:
        module, part = split_key(key)
        return f"{self.kohya_names.get(module, module)}.{part}"

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """scale_weight_norms through the package (apply_max_norm_regularization): (modules scaled, mean and
        max norm after scaling)."""
        device = next(self.lycoris.parameters()).device
        scaled, mean, largest = self.lycoris.apply_max_norm_regularization(max_norm, device)
        return int(scaled), float(mean), float(largest)

    def summary(self) -> str:
        n = sum(p.numel() for p in self.lycoris.parameters() if p.requires_grad)
        where = ", ".join(f"{part} {count}" for part, count in self.module_counts().items())
        extras = {k: v for k, v in self.spec.args.items() if k != "algo"}
        settings = ", ".join(f"{k}={v}" for k, v in extras.items())
        return (f"LyCORIS {self.spec.title} network ({PACKAGE}): {self.module_count} modules ({where}), "
                f"{n:,} trainable parameters (dim {self.spec.network_dim}, alpha {self.spec.network_alpha:g}"
                + (f", {settings}" if settings else "") + ")")
