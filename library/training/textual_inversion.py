"""Textual inversion: the method behind train_textual_inversion.py, and its job keys.

A new token (`token_string`, plus `token1`, `token2`, … for several vectors) is added to the tokenizer.
Its vectors live in one float32 parameter [n, width] of this method, not in the text encoder's token
matrix: two hooks on the token-embedding module route the new ids to that parameter. So
* the token matrix is never resized or written: every existing row stays bit-identical, and a
  checkpoint or LoRA saved from the same model can never carry the new rows;
* the vectors stay float32 under bf16/fp16 mixed precision (they are cast in the forward pass only).

Captions: a subset's own captions are used as written (they should contain the token; with several
vectors the token is expanded to all of them); images without a caption file get one of the object
or style templates with {} → the token.

Contrastive mode (`contrastive_data_dir`, a folder of GOOD images): each micro-batch of the training
(bad) images is paired with a batch of good images, scored with the same timesteps and noise, and the
loss becomes

    L = L_bad + λ · sg(L_bad) · max(0, m − (ln L_good − ln L_bad))

so the embedding must explain the bad images at least a factor e^m better than the good ones; used
as a negative embedding it then pushes away from the flaw rather than from the subject as a whole.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

from library.job_types import TextualInversionJob
from library.errors import ConfigError
from library.training.method import Method, TrainContext

log = logging.getLogger("pentadactyl")

# Captions for images without a caption file, in the manner of the original textual-inversion work:
# varied, plain sentences in which the new token is the only thing that names the subject.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a close-up photo of a {}", "a cropped photo of the {}", "a rendering of a {}",
    "a bright photo of the {}", "a dark photo of a {}", "a blurry photo of the {}", "a photo of one {}",
    "a good photo of a {}", "a photo of the small {}", "a photo of a large {}", "an old photo of a {}",
    "a detailed photo of the {}", "a picture of a {}", "a snapshot of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "a rendering in the style of {}",
    "an illustration in the style of {}", "a drawing in the style of {}", "a close-up painting in the style of {}",
    "a cropped painting in the style of {}", "a bright painting in the style of {}",
    "a dark picture in the style of {}", "artwork in the style of {}", "a small painting in the style of {}",
    "a large picture in the style of {}", "a detailed illustration in the style of {}",
    "a sketch in the style of {}", "a photo in the style of {}",
)

# ------------------------------------------------------------------------------------------ tokens


def new_token_names(token: str, num_vectors: int) -> list[str]:
    """The tokens of an embedding: token, token1, token2, … (sd-scripts' names), lowercased as CLIP reads them."""
    from library.embeddings import vector_token_names

    return [t.lower() for t in vector_token_names(token, num_vectors)]


def check_new_tokens(tokenizer, tokens: list[str], key: str = "token_string") -> None:
    """Refuse tokens that CLIP already reads as one word, or that the tokenizer already holds."""
    added = {t.lower() for t in tokenizer.get_added_vocab()}
    for token in tokens:
        if not token or re.search(r"\s", token):
            raise ConfigError(f"{key} = \"{tokens[0]}\": the token must be one word without spaces, "
                              "e.g. \"<handpalm>\".")
        if token in added:
            raise ConfigError(f"{key}: the token '{token}' is already registered in the tokenizer; choose another "
                              "token_string.")
        pieces = tokenizer.tokenize(token)
        if len(pieces) == 1 and pieces[0] != tokenizer.unk_token:
            raise ConfigError(f"{key}: '{token}' is already a word of the CLIP vocabulary; training it would "
                              f"change that word everywhere. Use a new string such as \"<{token.strip('<>')}-ti>\".")


def init_token_ids(tokenizer, init_word: str) -> list[int]:
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"init_word = {init_word!r} tokenizes to nothing; give a real word, e.g. init_word = "
                          "\"hand\", or remove the key (the embedding then starts from the mean token vector).")
    return list(ids)


class NewTokenRows:
    """Routes the new token ids of an nn.Embedding to a separate float32 parameter [n, width].

    A pre-hook replaces the new ids by 0 (a valid row: the matrix is not resized) and keeps them; the
    forward hook puts the parameter's rows where they were. Gradients reach only the parameter.
    """

    def __init__(self, embedding: torch.nn.Embedding, first_id: int, vectors: torch.nn.Parameter):
        self.embedding = embedding
        self.first_id = first_id
        self.vectors = vectors
        self._ids: torch.Tensor | None = None
        self._handles = [embedding.register_forward_pre_hook(self._before),
                         embedding.register_forward_hook(self._after)]

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.first_id) & (ids < self.first_id + self.vectors.shape[0])

    def _before(self, module, args):
        ids = args[0]
        self._ids = ids
        return (torch.where(self._mask(ids), torch.zeros_like(ids), ids),) + tuple(args[1:])

    def _after(self, module, args, output):
        ids, self._ids = self._ids, None
        mask = self._mask(ids)
        if not mask.any():
            return output
        rows = (ids - self.first_id).clamp(0, self.vectors.shape[0] - 1)
        new = self.vectors.to(output.device)[rows].to(output.dtype)
        return torch.where(mask.unsqueeze(-1), new, output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ------------------------------------------------------------------------------------------ captions


def _subset_captions(sub) -> list[str | None]:
    """The caption text (None: no caption file) of each image of a subset, read as the dataset reads it."""
    from library.dataset.captions import CAPTION_EXTENSIONS_DEFAULT, find_caption_file, read_caption_file
    from library.dataset.images import list_images

    if not Path(sub.image_dir).is_dir():
        return []  # the dataset reports a missing folder itself
    extensions = (sub.caption_extension,) if sub.caption_extension else CAPTION_EXTENSIONS_DEFAULT
    out = []
    for image in list_images(Path(sub.image_dir)):
        file = find_caption_file(image, extensions)
        out.append(read_caption_file(file, strict=False, all_lines=sub.caption.wildcard).text if file is not None else None)
    return out


def captions_without_token(datasets, token: str) -> tuple[int, int, str | None]:
    """(training images whose caption never shows the token, training images, an example) over all subsets.

    Uncaptioned images use templates filled with the token, unless their subset sets class_tokens
    (then class_tokens must contain the token). caption_prefix / caption_suffix count too.
    """
    token = token.lower()
    missing, total, example = 0, 0, None
    for ds in datasets or []:
        for sub in ds.subsets:
            if sub.is_reg:
                continue
            fixed = f"{sub.caption.prefix or ''} {sub.caption.suffix or ''}".lower()
            for text in _subset_captions(sub):
                total += 1
                if text is None:
                    text = sub.class_tokens if sub.class_tokens is not None else token
                if token not in f"{fixed} {text}".lower():
                    missing += 1
                    example = example or f"{sub.where}: \"{text}\""
    return missing, total, example


# ------------------------------------------------------------------------------------------ the method


class TextualInversionMethod(Method):
    name = "textual_inversion"

    def __init__(self, job: TextualInversionJob):
        self.job = job
        self.token = job.token_string.strip()
        self.templates = STYLE_TEMPLATES if job.use_style_template else OBJECT_TEMPLATES
        self.template_kind = "style" if job.use_style_template else "object"
        self.tokens: list[str] = []
        self.token_ids: list[int] = []
        self.vectors: torch.nn.Parameter | None = None
        self.init_vectors: torch.Tensor | None = None
        self.init_source = ""
        self.rows: NewTokenRows | None = None
        self.contrast = None  # the TrainDataset of good images in contrastive mode
        self.contrast_log: list[tuple[int, float]] = []  # (step, ln L_good − ln L_bad) of each micro-batch
        self._world = 1
        self._frozen: tuple[torch.Tensor, int] | None = None

    @property
    def artifact_suffix(self) -> str:
        return ".pt" if self.job.save_model_as == "pt" else ".safetensors"

    @property
    def needs_text_encoder_grad(self) -> bool:
        return True  # gradients flow through the (frozen) text encoder to the new vectors

    @property
    def num_vectors(self) -> int:
        return len(self.tokens)

    # ---- set-up

    def _initial_vectors(self, tokenizer, token_matrix: torch.Tensor) -> torch.Tensor:
        job, width = self.job, int(token_matrix.shape[1])
        asked = job.num_vectors_per_token  # None unless the user set it
        if job.weights:
            from library.embeddings import load_embedding

            embedding = load_embedding(job.weights, expected_width=width)
            if asked is not None and asked != embedding.num_vectors:
                raise ConfigError(f"weights = \"{job.weights}\" holds {embedding.num_vectors} vector(s) but "
                                  f"num_vectors_per_token = {asked}; remove num_vectors_per_token or make them match.")
            self.init_source = f"file {job.weights}"
            return embedding.vectors.float()
        if job.init_word is None:
            self.init_source = "the mean token vector"
            return token_matrix.float().mean(0, keepdim=True).repeat(asked or 1, 1)
        ids = init_token_ids(tokenizer, job.init_word)
        n = asked or len(ids)
        if len(ids) > n:
            raise ConfigError(f"init_word = \"{job.init_word}\" is {len(ids)} tokens but num_vectors_per_token = {n}; "
                              f"set num_vectors_per_token = {len(ids)} (or more), or use fewer words.")
        self.init_source = f"init_word \"{job.init_word}\" ({len(ids)} token(s))"
        return torch.stack([token_matrix[ids[i % len(ids)]].float() for i in range(n)])

    def setup(self, ctx: TrainContext) -> list[dict]:
        from transformers import AddedToken

        model = ctx.model
        for module in (model.unet, model.vae, model.text_encoder):
            module.requires_grad_(False)
        embedding = model.text_encoder.get_input_embeddings()
        tokenizer = model.tokenizer
        with torch.no_grad():
            init = self._initial_vectors(tokenizer, embedding.weight.detach())
        self.tokens = new_token_names(self.token, init.shape[0])
        check_new_tokens(tokenizer, self.tokens)
        tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True, lstrip=False, rstrip=False)
                              for t in self.tokens])
        self.token_ids = [tokenizer.convert_tokens_to_ids(t) for t in self.tokens]
        first = self.token_ids[0]
        if self.token_ids != list(range(first, first + len(self.tokens))):
            raise RuntimeError(f"the tokenizer gave the new tokens non-consecutive ids {self.token_ids}")
        self.init_vectors = init.clone()
        self.vectors = torch.nn.Parameter(init.to(ctx.device, torch.float32))
        self.rows = NewTokenRows(embedding, first, self.vectors)
        self._frozen = (embedding.weight, embedding.weight._version)
        self._world = ctx.world
        return [{"params": [self.vectors], "lr": self.job.learning_rate, "name": "embedding"}]

    def before_dataset(self, ctx: TrainContext) -> None:
        missing, total, example = captions_without_token(self.job.datasets, self.token)
        if total and missing == total:
            raise ConfigError(
                f"{self.job.source}: no training caption contains the token '{self.token}' (e.g. {example}), so "
                "the embedding would learn nothing. Put the token in the captions, set caption_prefix = "
                f"\"{self.token}\", or remove the caption files and class_tokens so that the object/style "
                f"templates are used (in folder mode, name the folder after the token: '10_{self.token}').")
        if missing:
            log.warning(f"{missing} of {total} training captions do not contain '{self.token}' (e.g. {example}); "
                        "those images teach the embedding nothing.")
        if self.job.contrastive_data_dir:
            self.contrast = self._contrast_dataset(ctx)

    def _contrast_dataset(self, ctx: TrainContext):
        """The good images: described like the first training subset (captions, buckets, batch size)."""
        from library.dataset import TrainDataset

        job = self.job
        first_ds = job.datasets[0]
        first_sub = next((s for s in first_ds.subsets if not s.is_reg), first_ds.subsets[0])
        good_dir = Path(job.contrastive_data_dir)
        sub = dataclasses.replace(first_sub, image_dir=good_dir, num_repeats=1, is_reg=False,
                                  where=f"{job.source} contrastive_data_dir")
        config = dataclasses.replace(first_ds, subsets=(sub,), where=f"{job.source} contrastive_data_dir")
        good = TrainDataset([config], seed=job.seed + 1, tokenizer=ctx.model.tokenizer,
                            caption_replacements=self.caption_replacements(),
                            num_workers=job.max_data_loader_n_workers, **self.dataset_options())
        ctx.model.vae.to(ctx.device, torch.float32)
        good.prepare_latents(ctx.model.vae, ctx.device, torch.float32, cache=job.cache_latents,
                             to_disk=job.cache_latents_to_disk, batch_size=job.vae_batch_size)
        log.info(f"contrastive mode: {good.num_train_images} good images from {good_dir}; margin "
                 f"{job.contrastive_margin}, weight {job.contrastive_weight}")
        return good

    # ---- training hooks

    def caption_replacements(self) -> dict[str, str] | None:
        if self.num_vectors > 1:
            return {self.token: " ".join(self.tokens)}
        return None

    def prompt_tokens(self) -> dict[str, list[str]]:
        # the sampler expands a multi-vector token in prompts ("tok" → "tok tok1 tok2")
        return {self.token: list(self.tokens)}

    def dataset_options(self) -> dict:
        return {"caption_templates": self.templates, "template_token": self.token}

    def _good_batch(self, step: int, micro: int) -> dict:
        """The good batch paired with micro-batch `micro` of `step`: a function of (step, micro) only."""
        per_step = self._world * self.job.gradient_accumulation_steps
        number = step * per_step + micro
        per_epoch = self.contrast.num_batches(1)
        batches = self.contrast.batches(number // per_epoch + 1, start=number % per_epoch, global_step=step)
        try:
            return next(batches)
        finally:
            batches.close()

    def adjust_loss(self, loss, batch, where, batch_loss):
        if self.contrast is None:
            return loss
        good = self._good_batch(where.step, where.number)
        # the same (seed, step, index) → the same timesteps and noise as the bad batch: a paired comparison
        good_loss = batch_loss(good, where.step, where.first_index)
        gap = torch.log(good_loss.clamp_min(1e-12)) - torch.log(loss.clamp_min(1e-12))
        self.contrast_log.append((where.step, float(gap.detach())))
        hinge = torch.relu(self.job.contrastive_margin - gap)
        return loss + self.job.contrastive_weight * loss.detach() * hinge

    def after_optimizer_step(self, step: int) -> None:
        weight, version = self._frozen
        current = self.rows.embedding.weight
        if current is not weight or current._version != version:
            raise RuntimeError("the text encoder's token matrix was modified during textual-inversion training; "
                               "only the new token vectors may change.")

    # ---- state and files

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"emb_params": self.vectors.detach()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        value = state["emb_params"]
        if tuple(value.shape) != tuple(self.vectors.shape):
            raise ConfigError(f"the saved embedding has shape {list(value.shape)}, this run trains "
                              f"{list(self.vectors.shape)}; use the same num_vectors_per_token and model.")
        with torch.no_grad():
            self.vectors.copy_(value.to(self.vectors.device, torch.float32))

    def saved_vectors(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.vectors.detach().to("cpu", dtype).contiguous()

    def save(self, path: Path, metadata: dict[str, str], dtype: torch.dtype, final: bool = False) -> list[Path]:
        from library.embeddings import save_embedding_pt, save_embedding_safetensors

        vectors = self.saved_vectors(dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.job.save_model_as == "pt":
            save_embedding_pt(path, vectors, step=int(metadata.get("ss_steps", 0) or 0),
                              sd_checkpoint_name=Path(self.job.pretrained_model_name_or_path).stem)
        else:
            save_embedding_safetensors(path, vectors, metadata=metadata)
        return [path]

    def metadata(self) -> dict:
        meta = {
            "ss_textual_inversion_token": self.token,
            "ss_num_vectors_per_token": str(self.num_vectors),
            "ss_init_word": self.job.init_word if self.job.init_word is not None else "None",
            "ss_caption_templates": self.template_kind,
        }
        if self.contrast is not None:
            meta["ss_contrastive_margin"] = repr(self.job.contrastive_margin)
            meta["ss_contrastive_weight"] = repr(self.job.contrastive_weight)
            if not self.job.no_dataset_metadata:
                meta["ss_contrastive_data_dir"] = Path(self.job.contrastive_data_dir).name
        return meta

    def summary(self) -> str:
        width = int(self.vectors.shape[1])
        text = (f"textual inversion: token '{self.token}' = {self.num_vectors} vector(s) × {width} "
                f"({', '.join(self.tokens)}), started from {self.init_source}; U-Net and text encoder frozen")
        if self.job.contrastive_data_dir:
            text += f"; contrastive against {self.job.contrastive_data_dir}"
        return text
