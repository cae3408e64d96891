"""What to train: `NetworkSpec`, built once from the job's network settings and validated there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from library.errors import ConfigError
from networks.names import NUM_SD1_BLOCKS

PRESETS: tuple[str, ...] = ("attention", "attention_qkvo")

# sd-scripts `network_args` keys we understand, plus two of our own for a separate text-encoder size.
NETWORK_ARG_KEYS: tuple[str, ...] = (
    "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "preset",
    "text_encoder_dim", "text_encoder_alpha",
)


@dataclass(frozen=True)
class NetworkSpec:
    """Ranks, alphas and target sets of one LoRA/LoCon network.

    - `network_dim`/`network_alpha`: Linear and 1x1-conv modules of the U-Net.
    - `conv_dim`/`conv_alpha`: k x k convolutions (LoCon); the U-Net conv set is trained only when given.
    - `text_encoder_dim`/`text_encoder_alpha`: text encoder; default to the linear ones.
    - `block_dims`/`block_alphas`/`conv_block_dims`/`conv_block_alphas`: 25 per-block values
      (IN00..IN11, MID, OUT00..OUT11) that replace the U-Net numbers; a 0 dim skips that block.
    - `preset`: "attention" (sd-scripts' set: every Linear/1x1 conv of the transformer blocks) or
      "attention_qkvo" (PEFT style: attn1/attn2 q, k, v, out only; text encoder q, k, v, out_proj only).
    - alpha None means alpha = rank (scale 1).
    """

    network_dim: int = 4
    network_alpha: float | None = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = 1.0
    text_encoder_dim: int | None = None
    text_encoder_alpha: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    preset: str = "attention"
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # the network_args as the user wrote them, for ss_network_args
    network_args: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def te_dim(self) -> int:
        return self.network_dim if self.text_encoder_dim is None else self.text_encoder_dim

    @property
    def te_alpha(self) -> float | None:
        return self.network_alpha if self.text_encoder_alpha is None else self.text_encoder_alpha

    @property
    def trains_conv(self) -> bool:
        return self.conv_dim is not None or self.conv_block_dims is not None

    @classmethod
    def from_args(
        cls,
        network_dim: int,
        network_alpha: float | None,
        network_args: Mapping[str, Any] | None = None,
        *,
        train_unet: bool = True,
        train_text_encoder: bool = True,
    ) -> "NetworkSpec":
        """Build a spec from sd-scripts-style settings (`network_args` values may be strings)."""
        args = dict(network_args or {})
        if "algo" in args:
            raise ConfigError(f"network_args: algo = {args['algo']} is a LyCORIS setting; set network_module = "
                              "\"lycoris.kohya\" (pip install lycoris-lora) to train LyCORIS' algorithms, or remove it.")
        unknown = sorted(k for k in args if k not in NETWORK_ARG_KEYS)
        if unknown:
            raise ConfigError(
                f"network_args: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                f"supported keys are {', '.join(NETWORK_ARG_KEYS)}. Remove or rename it "
                "(LyCORIS' settings need network_module = \"lycoris.kohya\")."
            )
        values: dict[str, Any] = {}
        for key in ("conv_dim", "text_encoder_dim"):
            if key in args:
                values[key] = _as_int(key, args[key])
        for key in ("conv_alpha", "text_encoder_alpha", "dropout", "rank_dropout", "module_dropout"):
            if key in args and args[key] is not None:
                values[key] = _as_float(key, args[key])
        for key in ("block_dims", "conv_block_dims"):
            if key in args:
                values[key] = tuple(_as_int(key, v) for v in _as_list(key, args[key]))
        for key in ("block_alphas", "conv_block_alphas"):
            if key in args:
                values[key] = tuple(_as_float(key, v) for v in _as_list(key, args[key]))
        if "preset" in args:
            values["preset"] = str(args["preset"])
        return cls(
            network_dim=_as_int("network_dim", network_dim),
            network_alpha=None if network_alpha is None else _as_float("network_alpha", network_alpha),
            train_unet=train_unet,
            train_text_encoder=train_text_encoder,
            network_args={k: _arg_text(v) for k, v in args.items()},
            **values,
        )

    def to_metadata(self) -> dict[str, str]:
        """The network part of the `ss_*` metadata (the trainer adds the run's keys)."""
        alpha = self.network_dim if self.network_alpha is None else self.network_alpha
        return {
            "ss_network_module": "networks.lora",  # the kohya module name readers know for this layout
            "ss_network_dim": str(self.network_dim),
            "ss_network_alpha": _number_text(alpha),
            "ss_network_args": json.dumps(dict(self.network_args)),
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
        }


def _validate(spec: NetworkSpec) -> None:
    if spec.preset not in PRESETS:
        raise ConfigError(f"network_args: preset = {spec.preset!r} is unknown; use one of {', '.join(PRESETS)}")
    for name in ("network_dim", "conv_dim", "text_encoder_dim"):
        value = getattr(spec, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name} = {value} must be a positive rank (e.g. 4, 32, 128)")
    if spec.network_dim == 0 and spec.block_dims is None:
        raise ConfigError("network_dim = 0 would train nothing; set a rank such as 4, 32 or 128")
    for name in ("dropout", "rank_dropout", "module_dropout"):
        value = getattr(spec, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"network_args: {name} = {value} must be in [0, 1), e.g. 0.1")
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        value = getattr(spec, name)
        if value is not None and len(value) != NUM_SD1_BLOCKS:
            raise ConfigError(
                f"network_args: {name} has {len(value)} values; SD1 needs {NUM_SD1_BLOCKS} "
                "(IN00..IN11, MID, OUT00..OUT11), e.g. \"4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4\""
            )
        if value is not None and any(v < 0 for v in value):
            raise ConfigError(f"network_args: {name} must not contain negative values")
    if not spec.train_unet and not spec.train_text_encoder:
        raise ConfigError("the network trains neither the U-Net nor the text encoder; enable at least one")


def _as_int(key: str, value: Any) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r} is not a number; write a whole number such as 8") from None
    if number != int(number):
        raise ConfigError(f"{key} = {value!r} must be a whole number such as 8")
    return int(number)


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r} is not a number; write e.g. 1 or 0.5") from None


def _as_list(key: str, value: Any) -> Sequence[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return value
    raise ConfigError(f"network_args: {key} must be 25 comma-separated numbers or a list, not {value!r}")


def _arg_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_number_text(v) if isinstance(v, (int, float)) else str(v) for v in value)
    return _number_text(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _number_text(value: float | int) -> str:
    """1.0 -> "1", 0.5 -> "0.5": how sd-scripts' readers show alphas."""
    return str(int(value)) if float(value).is_integer() else str(value)
