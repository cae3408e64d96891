"""Textual-inversion embeddings: the file formats users exchange, and adding their tokens to a model.

Reading (`load_embedding`, `load_embeddings`):
- `.safetensors` with `{"emb_params": Tensor[n, width]}` (A1111, ComfyUI, sd-scripts);
- A1111 `.pt`: `{"string_to_param": {"*": Tensor[n, width]}, "name", "step", ...}`, read by
  `library.safe_pickle`: a pickle that would call code to load is refused, never executed;
- diffusers `.bin`: `{token: Tensor[width] or [n, width]}`.
The prompt token is the file's base name, as in A1111 and ComfyUI (`EasyNegative.safetensors` →
"EasyNegative"); diffusers' `learned_embeds.bin` keeps the token stored inside it.

Writing: `save_embedding_safetensors` (with `modelspec.*` metadata) and `save_embedding_pt` (A1111's
layout), both atomic.

Using: `add_embeddings(tokenizer, text_encoder, embeddings)` registers token, token1, token2, … for a
multi-vector embedding (sd-scripts' naming), resizes the text encoder's token matrix and sets the new
rows; `expand_embedding_names(prompt, token_map)` turns "a photo of name" into
"a photo of name name1 name2". Matching is case-insensitive and on whole words, as CLIP lowercases.
"""

from __future__ import annotations

import datetime
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from library.errors import ModelLoadError
from library.fileio import atomic_path, save_safetensors_atomic
from library.safe_pickle import PICKLE_SUFFIXES, load_pickle

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SAFETENSORS_KEY = "emb_params"
A1111_TOKEN_ID = 265  # the id A1111 stores under string_to_token["*"]; it is never read back
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/textual-inversion"
DIFFUSERS_DEFAULT_STEM = "learned_embeds"


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: its prompt token and its vectors [n_vectors, width]."""

    name: str
    vectors: torch.Tensor
    source: str
    step: int | None = None

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


# ------------------------------------------------------------------------------------------- reading


def load_embedding(path: str | os.PathLike, expected_width: int | None = None) -> Embedding:
    """Read one embedding file; `expected_width` (the text encoder's width) is checked when given."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such embedding file; check the path (embeddings may be files "
                             "or a folder of .safetensors/.pt/.bin files).")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        name, vectors, step = path.stem, _vectors_from_safetensors(path), None
    elif suffix in PICKLE_SUFFIXES:
        name, vectors, step = _read_pickled_embedding(path)
    else:
        raise ModelLoadError(f"{path}: unknown embedding type '{path.suffix}'; expected "
                             f"{', '.join(EMBEDDING_SUFFIXES)}.")
    vectors = _as_matrix(vectors, path)
    if expected_width is not None and vectors.shape[1] != expected_width:
        raise ModelLoadError(
            f"{path}: embedding vectors are {vectors.shape[1]} wide but this model's text encoder needs "
            f"{expected_width}; the embedding was made for another model family "
            f"({_family_of_width(int(vectors.shape[1]))}). Use an SD1.x embedding.")
    return Embedding(name=name, vectors=vectors.detach().to(torch.float32).contiguous(), source=str(path), step=step)


def _family_of_width(width: int) -> str:
    return {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL"}.get(width, "not SD1.x")


def _vectors_from_safetensors(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); it is probably truncated, "
                             "copy or download it again.") from None
    if SAFETENSORS_KEY in tensors:
        return tensors[SAFETENSORS_KEY]
    if {"clip_l", "clip_g"} & set(tensors):
        raise ModelLoadError(f"{path}: this is an SDXL embedding (clip_l/clip_g); pentadactyl uses SD1.x embeddings.")
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ModelLoadError(f"{path}: expected one tensor named '{SAFETENSORS_KEY}', found "
                         f"{', '.join(sorted(tensors)[:5]) or 'none'}; this is not a textual-inversion embedding "
                         "(a LoRA belongs in networks, a model in pretrained_model_name_or_path).")


def _read_pickled_embedding(path: Path) -> tuple[str, torch.Tensor, int | None]:
    obj = load_pickle(path, ModelLoadError, "embedding")
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not an embedding dictionary.")

    if "string_to_param" in obj:  # A1111's layout
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else 0
            raise ModelLoadError(f"{path}: string_to_param holds {count} tensors; an A1111 embedding has exactly one.")
        step = obj.get("step")
        return path.stem, next(iter(params.values())), step if isinstance(step, int) else None
    if SAFETENSORS_KEY in obj:
        return path.stem, obj[SAFETENSORS_KEY], None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {token: tensor}
        token, vectors = next(iter(tensors.items()))
        name = _clean_token(str(token)) if path.stem == DIFFUSERS_DEFAULT_STEM else path.stem
        return name, vectors, None
    raise ModelLoadError(f"{path}: not a textual-inversion embedding: expected 'string_to_param' (A1111), "
                         f"'{SAFETENSORS_KEY}' or one {{token: tensor}} entry (diffusers); found keys "
                         f"{', '.join(map(str, list(obj)[:5]))}.")


def _clean_token(token: str) -> str:
    """diffusers tokens are often written "<cat-toy>"; the brackets are not part of a usable word."""
    return token.strip().strip("<>") or token


def _as_matrix(vectors: object, path: Path) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise ModelLoadError(f"{path}: the embedding is not a floating-point tensor.")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ModelLoadError(f"{path}: embedding tensor has shape {list(vectors.shape)}; expected [vectors, width].")
    return vectors


def embedding_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The embedding files named by `paths`: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for item in paths:
        item = Path(item)
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise ModelLoadError(f"{item}: no such embedding file or folder; check the 'embeddings' entry.")
    return files


def load_embeddings(paths: Iterable[str | os.PathLike], expected_width: int | None = None) -> list[Embedding]:
    """Load every embedding of `paths` (files or folders); two with the same token are an error."""
    embeddings: list[Embedding] = []
    seen: dict[str, Embedding] = {}
    for file in embedding_files(paths):
        embedding = load_embedding(file, expected_width)
        key = embedding.name.lower()
        if key in seen:
            raise ModelLoadError(f"{file}: its token '{embedding.name}' is already used by {seen[key].source}; "
                                 "rename one of the files (the file name is the prompt token).")
        seen[key] = embedding
        embeddings.append(embedding)
    return embeddings


# ------------------------------------------------------------------------------------------- writing


def save_embedding_safetensors(path: str | os.PathLike, vectors: torch.Tensor, name: str | None = None,
                               metadata: Mapping[str, str] | None = None) -> None:
    """`{"emb_params": [n, width]}` with SAI model-spec metadata, written atomically."""
    path = Path(path)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "pentadactyl",
        "modelspec.title": name or path.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "epsilon",
    }
    meta.update(metadata or {})
    save_safetensors_atomic({SAFETENSORS_KEY: _as_matrix(vectors.detach().cpu(), path)}, path, meta)


def save_embedding_pt(path: str | os.PathLike, vectors: torch.Tensor, name: str | None = None, step: int = 0,
                      sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None) -> None:
    """A1111's `.pt` layout (loadable with `weights_only=True`), written atomically."""
    path = Path(path)
    data = {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": _as_matrix(vectors.detach().cpu(), path).contiguous()},
        "name": name or path.stem,
        "step": int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# ------------------------------------------------------------------------------------------- tokens


def vector_token_names(name: str, num_vectors: int) -> list[str]:
    """Tokens of a multi-vector embedding: name, name1, name2, … (sd-scripts' scheme)."""
    return [name] + [f"{name}{i}" for i in range(1, num_vectors)]


def add_embeddings(tokenizer, text_encoder: torch.nn.Module, embeddings: Sequence[Embedding]) -> dict[str, list[str]]:
    """Register each embedding's tokens in the tokenizer and set their rows in the text encoder.

    Returns {embedding name: [token names]} for `expand_embedding_names`. A token that is already a
    word of the CLIP vocabulary is an error (it would change that word's meaning everywhere).
    Calling again with the same embeddings just rewrites their rows.
    """
    from transformers import AddedToken

    from library.models.lean import full_token_embedding

    full_token_embedding(text_encoder)  # a table kept in float16 while training: the rows go in as float32
    token_matrix = text_encoder.get_input_embeddings().weight
    width = int(token_matrix.shape[1])
    token_map: dict[str, list[str]] = {}
    wanted: list[tuple[str, torch.Tensor, Embedding]] = []
    for embedding in embeddings:
        if embedding.width != width:
            raise ModelLoadError(f"{embedding.source}: embedding vectors are {embedding.width} wide but this "
                                 f"model's text encoder needs {width} ({_family_of_width(embedding.width)} embedding?).")
        tokens = [t.lower() for t in vector_token_names(embedding.name, embedding.num_vectors)]
        token_map[embedding.name] = tokens
        wanted.extend((token, vector, embedding) for token, vector in zip(tokens, embedding.vectors))

    added = tokenizer.get_added_vocab()
    new_tokens = []
    for token, _, embedding in wanted:
        if token in added:
            continue
        if not re.fullmatch(r"[\w.\-]+", token):
            raise ModelLoadError(f"{embedding.source}: the token '{token}' (from the file name) may only hold "
                                 "letters, digits, '_', '-' and '.'; rename the file.")
        pieces = tokenizer.tokenize(token)
        if len(pieces) == 1:
            raise ModelLoadError(f"{embedding.source}: the token '{token}' is already a word of the CLIP "
                                 "vocabulary; rename the file to something unique (e.g. add a suffix).")
        new_tokens.append(AddedToken(token, single_word=True, normalized=True, lstrip=False, rstrip=False))
    if new_tokens:
        tokenizer.add_tokens(new_tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
    token_matrix = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector, _ in wanted:
            token_id = tokenizer.convert_tokens_to_ids(token)
            token_matrix[token_id] = vector.to(token_matrix.device, token_matrix.dtype)
    return token_map


def _name_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w\-.]){re.escape(name)}(?![\w\-])", re.IGNORECASE)


def expand_embedding_names(text: str, token_map: Mapping[str, Sequence[str]]) -> str:
    """Replace each whole-word embedding name by its vector tokens ("name" → "name name1 name2")."""
    for name, tokens in token_map.items():
        if len(tokens) > 1:
            text = _name_pattern(name).sub(" ".join(tokens), text)
    return text


def embeddings_in_text(text: str, names: Iterable[str]) -> list[str]:
    """The embedding names that occur (as whole words) in `text`, in the given order."""
    return [name for name in names if _name_pattern(name).search(text)]
