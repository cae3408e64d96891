"""Load and save SD1.x models: single-file LDM checkpoints and diffusers folders, offline.

    model = load_sd1("v1-5-pruned-emaonly.safetensors", dtype=torch.float32)
    model.unet, model.vae, model.text_encoder, model.tokenizer

Modules are built on the meta device and the file's tensors assigned into them, so loading costs about
as much as reading the file. `.ckpt`/`.pt` files are read by `library.safe_pickle`: tensors, plus the
Lightning bookkeeping of the released SD1.4/SD1.5 files as inert stand-ins; a pickle that would call
anything else is refused, never executed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from library.errors import ModelLoadError
from library.models import architecture as arch
from library.models import ldm_keys
from library.models.tokenizer import load_tokenizer
from library.safe_pickle import PICKLE_SUFFIXES, load_pickle

SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder")


@dataclass
class SD1Model:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    source: str
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # e.g. {"ignored_keys": [...]} for the log

    @property
    def vae_scale_factor(self) -> int:
        return arch.vae_scale_factor(self.vae.config)

    def release_vae(self, reload: Callable[[], torch.nn.Module]) -> None:
        """Let go of the VAE (training on cached latents needs none; it holds 0.3 GB in fp32); `vae` calls
        `reload` the next time it is asked for, so nothing that wants it later goes without."""
        self.__dict__["_vae"] = None
        self.__dict__["_vae_reload"] = reload


def _get_vae(model: SD1Model) -> torch.nn.Module:
    vae = model.__dict__.get("_vae")
    if vae is None and model.__dict__.get("_vae_reload") is not None:
        vae = model.__dict__["_vae"] = model.__dict__.pop("_vae_reload")()
    return vae


def _set_vae(model: SD1Model, vae: torch.nn.Module) -> None:
    model.__dict__["_vae"] = vae
    model.__dict__.pop("_vae_reload", None)


# the dataclass's `vae` field, read through: a released VAE is loaded again when next used
SD1Model.vae = property(_get_vae, _set_vae)


# --------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, safely. Errors name the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder. Set pretrained_model_name_or_path to your SD1.x "
                             ".safetensors/.ckpt file or diffusers folder (nothing is downloaded).")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ModelLoadError(f"{path}: unknown checkpoint type '{path.suffix}'; expected one of "
                         f"{', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the checkpoint is empty (0 bytes), as an interrupted download or copy "
                             "leaves it; download or copy it again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({size} bytes; {exc}). It is probably "
                             "truncated (an interrupted download or copy): download or copy it again.") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    obj = load_pickle(path, ModelLoadError, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
        if not tensors:
            raise ModelLoadError(f"{path}: holds no tensors at the top level or under 'state_dict'; "
                                 "it is not a model checkpoint.")
        obj = tensors
    return obj


# --------------------------------------------------------------------------------------------- loading


def load_sd1(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
             part_dtypes: Mapping[str, torch.dtype] | None = None) -> SD1Model:
    """Load an SD1.x single file or diffusers folder; modules are returned on the CPU in `dtype`, or per part
    in `part_dtypes` ({"unet": torch.bfloat16, …}: a frozen U-Net in the compute dtype from the first byte read).

    A .safetensors file is read one tensor at a time, each converted to its part's dtype at once, so the
    file's own precision and the target's are never both held for the whole model."""
    import diffusers  # noqa: F401  (import time is not load time: keep it out of the measurement)
    import transformers  # noqa: F401

    start = time.perf_counter()
    path = Path(path)
    dtypes = {part: (part_dtypes or {}).get(part, dtype) for part in DIFFUSERS_PARTS}
    if path.is_dir():
        model = _load_diffusers_folder(path, dtypes)
    else:
        model = _load_single_file(path, dtypes)
    model.load_seconds = time.perf_counter() - start
    for m in (model.unet, model.vae, model.text_encoder):
        m.requires_grad_(False)
        m.eval()
    return model


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_converted(path: Path, dtypes: Mapping[str, torch.dtype],
                    select: Callable[[list[str]], set[str]] | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors (those `select` picks from the file's names; all without it), each converted to its
    part's dtype as it is read (safetensors only).

    The file is memory-mapped (no copy of the raw bytes) and each tensor's pages are handed back to the system
    as soon as it is converted: a mapped file's pages count in the process's memory, so keeping the whole map
    while filling float32 modules from a 2 GB fp16 file would hold both (2 + 4 GB) at the peak."""
    import json as _json
    import mmap
    import warnings

    prefixes = ((arch.UNET_PREFIX, dtypes["unet"]), (arch.VAE_PREFIX, dtypes["vae"]),
                (arch.TEXT_PREFIX, dtypes["text_encoder"]))
    size = path.stat().st_size
    broken = (f"{path}: not a readable safetensors file ({size} bytes; {{}}). It is probably truncated (an "
              "interrupted download or copy): download or copy it again.")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        header_size = int.from_bytes(mapped[:8], "little") if size >= 8 else -1
        if not 0 < header_size <= size - 8:
            raise ModelLoadError(broken.format("its header is cut off or not a safetensors header"))
        try:
            header = _json.loads(mapped[8:8 + header_size])
        except ValueError as exc:
            raise ModelLoadError(broken.format(f"its header is not JSON: {exc}")) from None
        start = 8 + header_size
        state = {}
        header.pop("__metadata__", None)
        wanted_keys = select(list(header)) if select is not None else None
        for key, info in header.items():
            if wanted_keys is not None and key not in wanted_keys:
                continue
            begin, end = (start + o for o in info["data_offsets"])
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None or end > size:
                raise ModelLoadError(broken.format(f"tensor {key} is {'cut off' if dtype else info['dtype']}"))
            if end == begin:
                state[key] = torch.empty(info["shape"], dtype=dtype)
                continue
            with warnings.catch_warnings():  # a read-only buffer: the tensor is only read, then converted
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin)
            tensor = raw.view(dtype).reshape(info["shape"])
            wanted = next((d for prefix, d in prefixes if key.startswith(prefix)), None)
            state[key] = tensor.to(wanted, copy=True) if wanted is not None and tensor.is_floating_point() \
                else tensor.clone()
            del raw, tensor
            aligned = begin - begin % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
    return state


def _streamable(path: Path) -> bool:
    """A non-empty .safetensors file, which `_read_converted` reads (anything else goes to `read_state_dict`,
    whose messages say what is wrong with it)."""
    return path.suffix.lower() == ".safetensors" and path.is_file() and path.stat().st_size > 0


def _load_single_file(path: Path, dtypes: Mapping[str, torch.dtype]) -> SD1Model:
    if _streamable(path):
        state = _read_converted(path, dtypes)
    else:
        state = read_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    configs = arch.infer_configs(shapes, str(path))
    _refuse_other_unet_inputs(configs.unet, configs.vae["latent_channels"], path)
    unet = arch.build_unet(configs.unet, empty=True)
    vae = arch.build_vae(configs.vae, empty=True)
    text = arch.build_text_encoder(configs.text, empty=True)
    _assign(unet, ldm_keys.unet_from_ldm(state, configs.unet), dtypes["unet"], path, "U-Net")
    _assign(vae, ldm_keys.vae_from_ldm(state, configs.vae), dtypes["vae"], path, "VAE")
    _assign(text, ldm_keys.text_from_ldm(state, ldm_keys.text_module_prefix(text)), dtypes["text_encoder"], path,
            "text encoder")
    known = (arch.UNET_PREFIX, arch.VAE_PREFIX, arch.TEXT_PREFIX)
    ignored = sorted(k for k in state if not k.startswith(known))
    return SD1Model(unet, vae, text, load_tokenizer(), str(path), extra={"ignored_keys": ignored})


def _refuse_other_unet_inputs(unet_config: Mapping, latent_channels: int, path: Path) -> None:
    """Training and sampling feed the U-Net noisy latents only; an inpainting (or InstructPix2Pix) U-Net
    also wants a mask and a conditioning image, which nothing here makes, so refuse it before any work."""
    channels = unet_config["in_channels"]
    if channels == latent_channels:
        return
    if channels == latent_channels * 2 + 1:
        raise ModelLoadError(
            f"{path}: this is an inpainting checkpoint (conv_in takes {channels} channels: the latents, a mask and "
            "the masked image's latents); pentadactyl trains and samples text-to-image SD1.x models only. Use "
            "the matching non-inpainting base model (e.g. v1-5-pruned-emaonly.safetensors for "
            "sd-v1-5-inpainting): a LoRA trained on the base model also works on its inpainting model in "
            "A1111 and ComfyUI.")
    kind = "an InstructPix2Pix-style" if channels == latent_channels * 2 else "a non-standard"
    raise ModelLoadError(
        f"{path}: this is {kind} checkpoint (conv_in takes {channels} channels, not the {latent_channels} latent "
        "channels of a text-to-image model); pentadactyl trains and samples text-to-image SD1.x models only. "
        "Use the text-to-image model it was made from.")


def _assign(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, path: Path, part: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        detail = (f"missing {len(missing)} (e.g. {missing[:3]})" if missing else "") + (
            f"{'; ' if missing else ''}unexpected {len(unexpected)} (e.g. {unexpected[:3]})" if unexpected else "")
        raise ModelLoadError(f"{path}: the {part} weights do not match an SD1.x {part}: {detail}. "
                             "The file may be incomplete or a model of another architecture.")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(f"{path}: {part} tensor '{k}' has shape {tuple(v.shape)}, expected "
                                 f"{tuple(expected[k].shape)}; the file is not a consistent SD1.x model.")
    converted = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    module.load_state_dict(converted, strict=True, assign=True)


def _load_diffusers_folder(path: Path, dtypes: Mapping[str, torch.dtype]) -> SD1Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = [p for p in DIFFUSERS_PARTS if not (path / p / "config.json").is_file()]
    if missing:
        if (path / "transformer").is_dir() or (path / "text_encoder_2").is_dir():
            family = "SDXL" if (path / "text_encoder_2").is_dir() else "a transformer-based model (SD3/Flux)"
            raise ModelLoadError(f"{path}: this is {family}, not SD1.x; pentadactyl trains Stable Diffusion 1.x.")
        raise ModelLoadError(f"{path}: this folder is not a diffusers model: it lacks "
                             f"{', '.join(p + '/config.json' for p in missing)}. Point pretrained_model_name_or_path "
                             "at a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or an SD1.x single file.")
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    if unet_cfg.get("addition_embed_type") or unet_cfg.get("cross_attention_dim") == 2048:
        raise ModelLoadError(f"{path}: this is SDXL, not SD1.x; pentadactyl trains Stable Diffusion 1.x.")
    if unet_cfg.get("cross_attention_dim") == 1024:
        raise ModelLoadError(f"{path}: this is SD2.x, not SD1.x; pentadactyl trains Stable Diffusion 1.x.")
    vae_cfg = json.loads((path / "vae" / "config.json").read_text())
    _refuse_other_unet_inputs(unet_cfg, vae_cfg.get("latent_channels", 4), path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtypes["unet"], local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtypes["vae"], local_files_only=True)
        text = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtypes["text_encoder"],
                                             local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot load the diffusers folder: {exc}") from None
    tokenizer = load_tokenizer(path / "tokenizer" if (path / "tokenizer" / "vocab.json").is_file() else None)
    return SD1Model(unet, vae, text, tokenizer, str(path))


_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, key: str = "vae") -> torch.nn.Module:
    """A separate VAE, as sd-scripts' `vae = …` and WebUI's SD VAE setting take it: a single file with LDM
    names (`encoder.down.0.…`, as vae-ft-mse-840000-ema-pruned.safetensors; or a whole SD1 checkpoint, whose
    `first_stage_model.` part is used), a diffusers VAE folder (config.json + weights), or a diffusers model
    folder (its vae/). Load it before the checkpoint (a wrong path fails fast), then `use_vae`."""
    import diffusers  # noqa: F401  (as load_sd1: import time is not load time)

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{key} = \"{path}\": no such file or folder. Give a VAE .safetensors/.ckpt/.pt file "
                             "(e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers VAE folder, or remove "
                             f"{key} to use the checkpoint's own VAE.")
    if path.is_dir():
        vae = _load_vae_folder(path, dtype, key)
    else:
        if _streamable(path):  # only the VAE's tensors of a whole checkpoint are read
            state = _read_converted(path, {part: dtype for part in DIFFUSERS_PARTS}, select=_vae_keys)
        else:
            state = read_state_dict(path)
        if any(k.startswith(arch.VAE_PREFIX) for k in state):
            state = {k: v for k, v in state.items() if k.startswith(arch.VAE_PREFIX)}
        elif any(k.startswith("encoder.down.") for k in state):
            state = {arch.VAE_PREFIX + k: v for k, v in state.items() if k.startswith(_VAE_PARTS)}
        elif any(k.startswith("encoder.down_blocks.") for k in state):
            raise ModelLoadError(f"{key} = \"{path}\": this file has diffusers VAE names (encoder.down_blocks.…); "
                                 "put it in a folder with its config.json (a diffusers VAE folder) and give the "
                                 "folder, or use the single-file (LDM) release of the VAE.")
        else:
            raise ModelLoadError(f"{key} = \"{path}\": not a VAE: it has no encoder/decoder weights "
                                 f"(e.g. {sorted(state)[:2]}). Give an SD1 VAE file such as "
                                 "vae-ft-mse-840000-ema-pruned.safetensors.")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        try:
            config = arch.infer_vae_config(shapes)
        except (ModelLoadError, KeyError) as exc:
            raise ModelLoadError(f"{key} = \"{path}\": not a complete SD1 VAE ({exc})") from None
        vae = arch.build_vae(config, empty=True)
        _assign(vae, ldm_keys.vae_from_ldm(state, config), dtype, path, "VAE")
    vae.requires_grad_(False)
    vae.eval()
    return vae


def _vae_keys(keys: list[str]) -> set[str]:
    """The names of a VAE's tensors among a file's: a whole checkpoint's VAE part, or a VAE file's own names
    (all names when neither: the caller then says what the file is)."""
    return ({k for k in keys if k.startswith(arch.VAE_PREFIX)} or {k for k in keys if k.startswith(_VAE_PARTS)}
            or set(keys))


def use_vae(model: SD1Model, vae: torch.nn.Module, path: str | os.PathLike, key: str = "vae") -> None:
    """Put a separate VAE (from `load_vae`) in the model, after checking its latents match the U-Net's."""
    mine = (vae.config.latent_channels, arch.vae_scale_factor(vae.config))
    theirs = (model.vae.config.latent_channels, arch.vae_scale_factor(model.vae.config))
    if mine != theirs:
        raise ModelLoadError(f"{key} = \"{path}\": this VAE makes latents of {mine[0]} channels at 1/{mine[1]} of "
                             f"the image size; the model's U-Net works on {theirs[0]} channels at 1/{theirs[1]}. "
                             f"Use a VAE made for this model family (SD1.x), or remove {key}.")
    model.vae = vae.to(next(model.vae.parameters()).dtype)
    model.extra["vae"] = str(path)


def _load_vae_folder(path: Path, dtype: torch.dtype, key: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{key} = \"{path}\": the folder has no config.json (nor vae/config.json); give a "
                             "diffusers VAE folder or a VAE .safetensors file.")
    try:
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{key} = \"{path}\": cannot load the diffusers VAE folder: {exc}") from None


# --------------------------------------------------------------------------------------------- saving


def ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The single-file LDM state dict of three SD1.x modules (what A1111 and ComfyUI load)."""
    out = {}
    out.update(ldm_keys.unet_to_ldm(unet.state_dict(), unet.config))
    out.update(ldm_keys.vae_to_ldm(vae.state_dict(), vae.config))
    out.update(ldm_keys.text_to_ldm(text_encoder.state_dict()))
    if dtype is not None:
        out = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
    # meta tensors (a layout check without weights) stay on meta
    return {k: v.detach() if v.is_meta else v.detach().cpu().contiguous() for k, v in out.items()}


def save_sd1_single_file(path: str | os.PathLike, model: SD1Model, dtype: torch.dtype | None = None,
                         metadata: dict[str, str] | None = None) -> None:
    from library.fileio import save_safetensors_atomic

    save_safetensors_atomic(ldm_state_dict(model.unet, model.vae, model.text_encoder, dtype), path, metadata)


def save_sd1_diffusers(path: str | os.PathLike, model: SD1Model) -> None:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import DDPMScheduler

    from library.fileio import atomic_dir

    with atomic_dir(path) as tmp:
        model.unet.save_pretrained(tmp / "unet")
        model.vae.save_pretrained(tmp / "vae")
        model.text_encoder.save_pretrained(tmp / "text_encoder")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        DDPMScheduler.from_config(arch.SD1_SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
