"""The job keys of each script and their types, for readers, IDEs and type checkers.

Written by tools/job_types.py from library/scripts.py; do not edit by hand (a test keeps it in step).
A `library.config.Job` of a script has these attributes; a key whose default is none is `| None`.
"""

from __future__ import annotations

from typing import Any, Protocol


class JobBase(Protocol):
    script: str
    source: str
    given: frozenset[str]

    def replace(self, **changes: Any) -> Any: ...

    def as_dict(self) -> dict[str, Any]: ...


class TrainingJob(JobBase, Protocol):
    """The keys all three training scripts share (what the loop reads)."""

    datasets: list[Any]
    adaptive_noise_scale: float | None
    bucket_no_upscale: bool
    bucket_reso_steps: int
    cache_latents: bool
    cache_latents_to_disk: bool
    caption_dropout_every_n_epochs: int
    caption_dropout_rate: float
    caption_extension: str | None
    caption_prefix: str | None
    caption_separator: str
    caption_suffix: str | None
    caption_tag_dropout_rate: float
    caption_templates: list[str] | None
    clip_skip: int
    color_aug: bool
    cpu_bf16: str
    dataset_config: str | None
    debiased_estimation_loss: bool
    debug_dataset: bool
    dynamo_backend: str
    ema_decay: float | None
    enable_bucket: bool
    enable_wildcard: bool
    flip_aug: bool
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    huber_c: float
    huber_scale: float
    huber_schedule: str
    ip_noise_gamma: float
    ip_noise_gamma_random_strength: bool
    keep_tokens: int
    keep_tokens_separator: str | None
    learning_rate: float
    log_prefix: str | None
    log_with: str
    logging_dir: str | None
    loss_type: str
    lr_scheduler: str
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_warmup_steps: int
    max_bucket_reso: int
    max_data_loader_n_workers: int
    max_grad_norm: float
    max_image_pixels: int
    max_timestep: int
    max_token_length: int
    max_train_epochs: int | None
    max_train_steps: int
    metadata_author: str | None
    metadata_description: str | None
    metadata_license: str | None
    metadata_tags: str | None
    metadata_title: str | None
    min_bucket_reso: int
    min_snr_gamma: float | None
    min_timestep: int
    mixed_precision: str
    multires_noise_discount: float
    multires_noise_iterations: int
    no_dataset_metadata: bool
    no_metadata: bool
    noise_offset: float
    noise_offset_random_strength: bool
    optimizer_args: list[str] | None
    optimizer_type: str
    output_dir: str
    output_name: str | None
    pretrained_model_name_or_path: str | None
    prior_loss_weight: float
    random_crop: bool
    reg_data_dir: str | None
    resolution: int | list[int]
    resume: str | None
    sample_at_first: bool
    sample_every_n_epochs: int | None
    sample_every_n_steps: int | None
    sample_prompts: str | None
    sample_sampler: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_last_n_epochs: int | None
    save_last_n_steps: int | None
    save_model_as: str
    save_precision: str
    save_state: bool
    save_state_on_train_end: bool
    sdpa: bool
    secondary_separator: str | None
    seed: int
    shuffle_caption: bool
    skip_bad_images: bool
    token_warmup_min: int
    token_warmup_step: float
    train_batch_size: int
    train_data_dir: str | None
    training_comment: str | None
    vae: str | None
    vae_batch_size: int
    validate_every_n_steps: int | None
    validation_split: float
    weighted_captions: bool
    xformers: bool


class NetworkJob(TrainingJob, Protocol):
    """train_network.py"""

    network_alpha: float
    network_args: list[str] | None
    network_dim: int
    network_dropout: float | None
    network_module: str
    network_train_text_encoder_only: bool
    network_train_unet_only: bool
    network_weights: str | None
    scale_weight_norms: float | None
    text_encoder_lr: float | None
    unet_lr: float | None


class TextualInversionJob(TrainingJob, Protocol):
    """train_textual_inversion.py"""

    contrastive_data_dir: str | None
    contrastive_margin: float
    contrastive_weight: float
    init_word: str | None
    num_vectors_per_token: int | None
    token_string: str | None
    use_object_template: bool
    use_style_template: bool
    weights: str | None


class DreamBoothJob(NetworkJob, Protocol):
    """train_dreambooth.py"""

    class_image_batch_size: int
    class_image_cfg_scale: float
    class_image_sampler: str
    class_image_steps: int
    class_negative_prompt: str
    class_prompt: str | None
    dreambooth_mode: str
    num_class_images: int
    save_diffusers_folder: bool
    stop_text_encoder_training: int | None


class SampleJob(JobBase, Protocol):
    """sample.py"""

    batch_size: int
    cfg_scale: float
    clip_skip: int
    device: str
    dtype: str
    embeddings: list[str] | None
    grid: bool
    height: int
    images_per_prompt: int
    lora_dir: str | None
    max_token_length: int | None
    negative_prompt: str
    network_mode: str
    networks: list[str] | None
    output_dir: str
    output_name: str | None
    pretrained_model_name_or_path: str | None
    prompt: str | None
    prompt_file: str | None
    prompts: list[str] | None
    sampler: str
    seed: int
    seeds: list[int] | None
    steps: int
    sweep_multipliers: list[float] | None
    sweep_network: str | None
    vae: str | None
    vae_dtype: str
    width: int
