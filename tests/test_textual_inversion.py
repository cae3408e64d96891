"""Textual inversion: only the new vectors train, the embedding learns, files load in diffusers and A1111's
layout, contrastive mode widens the bad/good gap, and user mistakes give clear errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from library.config import load_job
from library.errors import ConfigError, ModelLoadError
from library.models.loading import load_sd1
from library.toy_data import write_shape_folder
from library.training.loop import train
from library.training.method import TrainContext
from library.training.textual_inversion import OBJECT_TEMPLATES, TextualInversionMethod
from support import write_job_file

REPO = Path(__file__).resolve().parent.parent
TOKEN = "<shape-ti>"
ATTENTION_GAIN = 20.0  # cross-attention output × 20 …
QUERY_GAIN = 10.0  # … and sharper cross-attention, so that what the text adds depends on the image


@pytest.fixture(scope="module")
def listening_model(tmp_path_factory) -> Path:
    """The tiny model with its cross-attention outputs scaled up, so that its U-Net depends on the text
    enough for an embedding to make a measurable difference (the random tiny model barely listens)."""
    from library.models.loading import save_sd1_single_file
    from library.models.tiny import build_tiny_model

    model = build_tiny_model(0)
    with torch.no_grad():
        for name, module in model.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(ATTENTION_GAIN)
                module.to_out[0].bias.mul_(ATTENTION_GAIN)
                module.to_q.weight.mul_(QUERY_GAIN)
    path = tmp_path_factory.mktemp("model") / "tiny-listening.safetensors"
    save_sd1_single_file(path, model)
    return path


def uncaptioned_folder(folder: Path, background: str, seed: int, count: int = 4) -> Path:
    """Red circles on one background, without caption files (so the templates are used)."""
    write_shape_folder(folder, count=count, size=(64, 64), seed=seed, shapes=("circle",), colours=("red",),
                       backgrounds=(background,))
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"bad": uncaptioned_folder(root / "bad", "white", 1), "good": uncaptioned_folder(root / "good", "black", 2)}


def write_job(folder: Path, model: Path, image_dir: Path, **keys) -> Path:
    base = {
        "pretrained_model_name_or_path": str(model), "output_dir": str(folder / "out"), "output_name": "shape",
        "token_string": TOKEN, "init_word": "red circle", "learning_rate": 1e-2, "max_train_steps": 8,
        "seed": 7, "train_batch_size": 2, "cache_latents": True, "save_precision": "float",
        "max_data_loader_n_workers": 0,
    }
    return write_job_file(folder, {**base, **keys}, [{"image_dir": str(image_dir)}])


def job_of(path: Path, **overrides):
    return load_job("train_textual_inversion", config_path=str(path), overrides=overrides)


class CheckedMethod(TextualInversionMethod):
    """Checks after every optimizer step that the model sees every old token row exactly as at the start."""

    def setup(self, ctx):
        groups = super().setup(ctx)
        self.checked_steps = 0
        self.text_encoder = ctx.model.text_encoder
        self.start_matrix = self.text_encoder.get_input_embeddings().weight.detach().clone()
        self.frozen_start = {k: v.detach().clone() for k, v in
                             list(ctx.model.unet.state_dict().items()) + list(self.text_encoder.state_dict().items())}
        return groups

    def after_optimizer_step(self, step):
        super().after_optimizer_step(step)
        vocab = self.start_matrix.shape[0]
        with torch.no_grad():
            rows = self.text_encoder.get_input_embeddings()(torch.arange(vocab + self.num_vectors))
        assert torch.equal(rows[:vocab], self.start_matrix), "an existing token row changed"
        assert torch.equal(rows[vocab:], self.vectors.detach().to(rows.dtype))
        assert self.vectors.dtype == torch.float32
        self.checked_steps += 1


def fixed_noise_losses(model, method, vectors: torch.Tensor, folder: Path, caption: str,
                       timesteps: tuple[int, int] = (0, 1000)) -> float:
    """Mean loss on a folder's images with `vectors` in the embedding, at fixed timesteps and noise."""
    from library.dataset import TrainDataset, resolve_datasets
    from library.text_encoding import encode_texts
    from library.training import noise as nz

    configs = resolve_datasets({"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
                               {"datasets": [{"subsets": [{"image_dir": str(folder)}]}]}, "test", Path.cwd())
    data = TrainDataset(configs, seed=0, caption_templates=["{}"], template_token="unused", num_workers=0)
    data.cache_latents(model.vae, "cpu", torch.float32)
    latents = torch.cat([b["latents"] for b in data.batches(1)])
    alphas = nz.sd1_alphas_cumprod()
    saved = method.vectors.detach().clone()
    generator = torch.Generator().manual_seed(0)
    values = []
    with torch.no_grad():
        method.vectors.copy_(vectors)
        context = encode_texts(model.tokenizer, model.text_encoder, [caption] * len(latents))
        for _ in range(4):
            t = torch.randint(*timesteps, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            pred = model.unet(nz.add_noise(latents, noise, t, alphas), t, encoder_hidden_states=context).sample
            values.append(torch.nn.functional.mse_loss(pred, noise).item())
        method.vectors.copy_(saved)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, listening_model, images):
    """One 2-vector run on the bad images, shared by the tests that inspect its result."""
    folder = tmp_path_factory.mktemp("trained")
    job = job_of(write_job(folder, listening_model, images["bad"], max_train_steps=40))
    method = CheckedMethod(job)
    return train(job, method)


def test_only_new_rows_change_and_everything_else_stays_frozen(trained):
    method, model = trained.method, trained.model
    assert method.checked_steps == 40
    assert method.tokens == [TOKEN, TOKEN + "1"]
    assert model.text_encoder.get_input_embeddings().weight.shape[0] == 49408  # never resized: nothing can leak
    after = list(model.unet.state_dict().items()) + list(model.text_encoder.state_dict().items())
    assert all(torch.equal(value, method.frozen_start[key]) for key, value in after)


def test_embedding_learns_its_images_and_moves_from_init(trained, images):
    method, model = trained.method, trained.model
    caption = f"a photo of a {TOKEN} {TOKEN}1"
    learned = method.vectors.detach().clone()
    before = fixed_noise_losses(model, method, method.init_vectors, images["bad"], caption)
    after = fixed_noise_losses(model, method, learned, images["bad"], caption)
    assert after < 0.99 * before, (before, after)
    init_tokens = model.tokenizer("red circle", add_special_tokens=False).input_ids
    assert torch.equal(method.init_vectors, model.text_encoder.get_input_embeddings().weight[init_tokens].float())
    moved = (learned - method.init_vectors).norm(dim=1)
    assert (moved > 0.5 * method.init_vectors.norm(dim=1)).all(), moved
    assert len(trained.losses) == 40 and all(map(torch.isfinite, map(torch.tensor, trained.losses)))


def test_saved_file_matches_in_diffusers_and_in_our_sampler(trained, listening_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors import safe_open

    from library.embeddings import add_embeddings, expand_embedding_names, load_embedding
    from library.text_encoding import encode_texts

    file = trained.final_files[0]
    assert file.name == "shape.safetensors"
    with safe_open(str(file), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 64)
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["ss_textual_inversion_token"] == TOKEN and meta["ss_steps"] == "40"
    assert torch.equal(load_embedding(file).vectors, trained.method.vectors.detach().cpu())

    prompt = f"a photo of a {TOKEN} on a table"
    ours_model = trained.model
    with torch.no_grad():
        ours = encode_texts(ours_model.tokenizer, ours_model.text_encoder,
                            [expand_embedding_names(prompt, trained.method.prompt_tokens())])

        fresh = load_sd1(listening_model)
        pipe = StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                       unet=fresh.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.load_textual_inversion(str(file), token=TOKEN)
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        theirs = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

        # sample.py's path: the file's name is the token
        renamed = file.with_name("myshape-ti.safetensors")  # "shape" itself is a CLIP word
        shutil.copy(file, renamed)
        other = load_sd1(listening_model)
        token_map = add_embeddings(other.tokenizer, other.text_encoder, [load_embedding(renamed)])
        by_name = encode_texts(other.tokenizer, other.text_encoder,
                               [expand_embedding_names("a photo of a myshape-ti on a table", token_map)])
        torch.testing.assert_close(by_name, ours, rtol=0, atol=1e-5)


def test_a1111_pt_periodic_saves_sampling_bf16_and_resume_from_file(tmp_path, listening_model, images):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of a {TOKEN} --s 2 --d 1\na photo of a hand --n {TOKEN} --s 2 --d 1\n")
    job = job_of(write_job(tmp_path / "a", listening_model, images["bad"], max_train_steps=3, init_word="hand",
                           save_model_as="pt", save_every_n_steps=2, mixed_precision="bf16",
                           sample_prompts=str(prompts), sample_every_n_steps=2))
    result = train(job, CheckedMethod(job))
    assert result.method.checked_steps == 3  # only the new rows changed under bf16 autocast too
    out = tmp_path / "a" / "out"
    assert sorted(p.name for p in out.glob("*.pt")) == ["shape-step00000002.pt", "shape.pt"]
    raw = torch.load(out / "shape.pt", weights_only=True)
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert raw["name"] == "shape" and raw["step"] == 3 and list(raw["string_to_param"]) == ["*"]
    assert torch.equal(raw["string_to_param"]["*"], result.method.vectors.detach().cpu())
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 4  # two prompts at step 2 and at the end
    from PIL import Image

    assert TOKEN in Image.open(samples[-1]).text["parameters"]

    resumed = job_of(write_job(tmp_path / "b", listening_model, images["bad"], max_train_steps=1,
                               weights=str(out / "shape.pt"), init_word=None))
    method = TextualInversionMethod(resumed)
    train(resumed, method)
    assert torch.equal(method.init_vectors, raw["string_to_param"]["*"])
    assert method.num_vectors == 1 and "file" in method.init_source


@pytest.mark.slow
def test_contrastive_mode_widens_the_gap_between_bad_and_good(tmp_path, listening_model, images):
    """Bad: red circles on white; good: red circles on black. Low timesteps, where the U-Net sees the image."""
    caption, timesteps = f"a photo of a {TOKEN} {TOKEN}1", (50, 150)
    keys = dict(max_train_steps=30, learning_rate=2e-2, train_batch_size=4, min_timestep=50, max_timestep=150)

    def gap_growth(folder: Path, **more) -> tuple[float, object]:
        job = job_of(write_job(folder, listening_model, images["bad"], **keys, **more))
        result = train(job, TextualInversionMethod(job))
        gaps = []
        for vectors in (result.method.init_vectors, result.method.vectors.detach().clone()):
            good = fixed_noise_losses(result.model, result.method, vectors, images["good"], caption, timesteps)
            bad = fixed_noise_losses(result.model, result.method, vectors, images["bad"], caption, timesteps)
            gaps.append(math.log(good) - math.log(bad))
        return gaps[1] - gaps[0], result

    plain, _ = gap_growth(tmp_path / "plain")
    contrastive, result = gap_growth(tmp_path / "contrastive", contrastive_data_dir=str(images["good"]),
                                     contrastive_margin=0.5)
    assert result.method.contrast is not None and len(result.method.contrast_log) == 30
    assert contrastive > 0.002 and contrastive > plain + 0.001, (plain, contrastive)
    meta = __import__("safetensors").safe_open(str(result.final_files[0]), "pt").metadata()
    assert meta["ss_contrastive_margin"] == "0.5" and meta["ss_contrastive_data_dir"] == "good"


# ------------------------------------------------------------------------------------------ errors


def setup_only(path: Path, model_path: Path, **overrides):
    job = job_of(path, **overrides)
    method = TextualInversionMethod(job)
    model = load_sd1(model_path)
    ctx = TrainContext(job, model, torch.device("cpu"), torch.float32)
    return method, method.setup(ctx), ctx


def test_token_already_in_vocabulary_is_refused(tmp_path, tiny_single_file, images):
    path = write_job(tmp_path, tiny_single_file, images["bad"])
    with pytest.raises(ConfigError, match="'hand' is already a word of the CLIP vocabulary"):
        setup_only(path, tiny_single_file, token_string="hand")
    with pytest.raises(ConfigError, match="one word without spaces"):
        setup_only(path, tiny_single_file, token_string="two words")


def test_init_word_that_tokenizes_to_nothing_is_refused(tmp_path, tiny_single_file, images):
    path = write_job(tmp_path, tiny_single_file, images["bad"])
    with pytest.raises(ConfigError, match="init_word = ' ' tokenizes to nothing"):
        setup_only(path, tiny_single_file, init_word=" ")
    with pytest.raises(ConfigError, match="set num_vectors_per_token = 2"):
        setup_only(path, tiny_single_file, init_word="red circle", num_vectors_per_token=1)


def test_resume_file_of_the_wrong_width_is_refused(tmp_path, tiny_single_file, images):
    from library.embeddings import save_embedding_safetensors

    wrong = tmp_path / "sd15-embedding.safetensors"
    save_embedding_safetensors(wrong, torch.zeros(2, 768))
    path = write_job(tmp_path, tiny_single_file, images["bad"], weights=str(wrong))
    with pytest.raises(ModelLoadError, match=r"sd15-embedding.safetensors.*768 wide.*needs 64"):
        setup_only(path, tiny_single_file)
    right = tmp_path / "three.safetensors"
    save_embedding_safetensors(right, torch.zeros(3, 64))
    with pytest.raises(ConfigError, match="holds 3 vector.*num_vectors_per_token = 2"):
        setup_only(path, tiny_single_file, weights=str(right), num_vectors_per_token=2)


def test_captions_without_the_token_and_conflicting_keys_are_refused(tmp_path, tiny_single_file):
    captioned = tmp_path / "captioned"
    write_shape_folder(captioned, count=2, size=(64, 64), seed=0)  # "a red circle on a white background"
    path = write_job(tmp_path, tiny_single_file, captioned)
    method, _, ctx = setup_only(path, tiny_single_file)
    with pytest.raises(ConfigError, match=f"no training caption contains the token '{TOKEN}'.*caption_prefix"):
        method.before_dataset(ctx)
    prefixed = setup_only(path, tiny_single_file, caption_prefix=TOKEN)
    prefixed[0].before_dataset(prefixed[2])  # the prefix puts the token in every caption
    with pytest.raises(ConfigError, match="exclude each other"):
        TextualInversionMethod(job_of(path, use_object_template=True, use_style_template=True))
    with pytest.raises(ConfigError, match="without contrastive_data_dir"):
        TextualInversionMethod(job_of(path, contrastive_margin=0.2))
    with pytest.raises(ConfigError, match="token_string"):
        load_job("train_textual_inversion", config_path=str(path), overrides={"token_string": None})


def test_templates_and_multi_vector_captions():
    method = TextualInversionMethod.__new__(TextualInversionMethod)  # the caption hooks need no model
    method.token, method.tokens = TOKEN, [TOKEN, TOKEN + "1", TOKEN + "2"]
    method.templates = OBJECT_TEMPLATES
    assert method.caption_replacements() == {TOKEN: f"{TOKEN} {TOKEN}1 {TOKEN}2"}
    assert method.dataset_options() == {"caption_templates": OBJECT_TEMPLATES, "template_token": TOKEN}
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES)


@pytest.mark.parametrize("preset", ["ti_handpalm.toml", "ti_negative_hands.toml"])
def test_presets_load_and_their_prompts_use_the_token(preset):
    from library.sampling.prompts import parse_prompt_file

    job = load_job("train_textual_inversion", config_path=str(REPO / "dataset_configs" / preset))
    assert job.lr_scheduler == "constant" and job.learning_rate == 1e-4 and job.max_train_steps == 5000
    assert job.init_word == "hand" and job.optimizer_type == "AdamW"
    specs = parse_prompt_file(REPO / job.sample_prompts)
    where = [s.negative_prompt if "negative" in preset else s.prompt for s in specs]
    assert sum(job.token_string in text for text in where) == len(specs) // 2  # pairs: without and with
    assert len({s.seed for s in specs}) < len(specs)  # the pairs share seeds
