"""Job keys of the training scripts (sd-scripts' names), declared once; the README's TOML reference lists them."""

from __future__ import annotations

from library.schema import Field
from library.training.optimizers import OPTIMIZERS, SCHEDULERS

TRAINING_FIELDS: dict[str, Field] = {
    "max_train_steps": Field("int", 1600, "optimizer steps to train (ignored when max_train_epochs is set).",
                             minimum=1, section="training"),
    "max_train_epochs": Field("int", None, "epochs to train; overrides max_train_steps.", minimum=1, section="training"),
    "gradient_accumulation_steps": Field("int", 1, "micro-batches per optimizer step.", minimum=1, section="training"),
    "mixed_precision": Field("str", "no", "no, fp16 (CUDA only, with loss scaling) or bf16. Frozen weights are "
                             "kept in this dtype, trained weights in fp32.", choices=("no", "fp16", "bf16"),
                             section="training"),
    "cpu_bf16": Field("str", "auto", "on a CPU, mixed_precision = \"bf16\" runs in bf16 only where the CPU has bf16 "
                      "instructions (AVX512-BF16 or AMX), else in fp32 (faster there; said in the log); \"always\" "
                      "keeps bf16 anyway, for its smaller memory.", choices=("auto", "always"), section="training"),
    "gradient_checkpointing": Field("bool", False, "recompute activations in backward: less memory, ~30% slower.",
                                    section="training"),
    "max_grad_norm": Field("float", 1.0, "clip the gradient norm to this (0 = no clipping).", minimum=0,
                           section="training"),
    "learning_rate": Field("float", 1e-4, "learning rate of every trained part without its own rate.", minimum=0,
                           section="training"),
    "optimizer_type": Field("str", "AdamW", f"{', '.join(OPTIMIZERS)}, or a class path like torch.optim.Adam.",
                            section="training"),
    "optimizer_args": Field("list[str]", None, "extra optimizer arguments, e.g. [\"weight_decay=0.01\"].",
                            section="training"),
    "lr_scheduler": Field("str", "constant", "learning-rate schedule.", choices=SCHEDULERS, section="training"),
    "lr_warmup_steps": Field("int", 0, "steps of linear warm-up.", minimum=0, section="training"),
    "lr_scheduler_num_cycles": Field("int", 1, "restarts of cosine_with_restarts.", minimum=1, section="training"),
    "lr_scheduler_power": Field("float", 1.0, "power of the polynomial schedule.", section="training"),
    "noise_offset": Field("float", 0.0, "per-channel noise offset (0.05–0.1 helps very dark/bright images).",
                          minimum=0, section="training"),
    "noise_offset_random_strength": Field("bool", False, "scale noise_offset by a uniform random factor in [0, 1) "
                                          "for each sample (sd-scripts draws one per batch).", section="training"),
    "adaptive_noise_scale": Field("float", None, "add this × abs(mean) of each latent channel to noise_offset (per "
                                  "sample and channel, clamped at 0; may be negative); needs noise_offset. "
                                  "Unset = off.", section="training"),
    "multires_noise_iterations": Field("int", 0, "multi-resolution (pyramid) noise: add up to this many Gaussian "
                                       "layers, layer i at 1/rⁱ of the latent size (r random in 2–4, upsampled) "
                                       "and weighted multires_noise_discountⁱ (6–10 is typical); 0 = off.",
                                       minimum=0, section="training"),
    "multires_noise_discount": Field("float", 0.3, "weight factor of each further pyramid-noise layer (no effect "
                                     "without multires_noise_iterations).", minimum=0, maximum=1,
                                     section="training"),
    "ip_noise_gamma": Field("float", 0.0, "input-perturbation noise: the U-Net's input gets this × extra Gaussian "
                            "noise, its target stays the original noise (0.1 is typical); 0 = off.", minimum=0,
                            section="training"),
    "ip_noise_gamma_random_strength": Field("bool", False, "scale ip_noise_gamma by a random factor in [0, 1) per "
                                            "sample.", section="training"),
    "min_snr_gamma": Field("float", None, "Min-SNR loss weighting γ (5 is typical); unset = off.", minimum=0,
                           section="training"),
    "debiased_estimation_loss": Field("bool", False, "weight each sample's loss by 1/√SNR(t), SNR capped at 1000 "
                                      "(debiased estimation); with min_snr_gamma both weights apply.",
                                      section="training"),
    "min_timestep": Field("int", 0, "lowest timestep sampled.", minimum=0, maximum=999, section="training"),
    "max_timestep": Field("int", 1000, "highest timestep sampled (exclusive).", minimum=1, maximum=1000,
                          section="training"),
    "loss_type": Field("str", "l2", "l2 (MSE), l1, huber (2c·(√(d²+c²) − c)) or smooth_l1 (2·(√(d²+c²) − c)), "
                       "as sd-scripts defines them; c per sample from huber_schedule.",
                       choices=("l2", "l1", "huber", "smooth_l1"), section="training"),
    "huber_c": Field("float", 0.1, "the huber / smooth_l1 threshold c (and the schedules' floor).", minimum=0,
                     section="training"),
    "huber_schedule": Field("str", "snr", "c per sample from its timestep: snr ((1 − c)/(1 + σ_t)² + c, σ_t = "
                            "√((1 − ᾱ_t)/ᾱ_t)), exponential (e^(−αt)·huber_scale, α = −ln(c)/1000) or constant "
                            "(c·huber_scale).", choices=("snr", "exponential", "constant"), section="training"),
    "huber_scale": Field("float", 1.0, "scale of the exponential and constant huber schedules.", minimum=0,
                         section="training"),
    "xformers": Field("bool", False, "use xformers attention (CUDA and the xformers package needed).",
                      section="training"),
    "sdpa": Field("bool", True, "use torch's scaled-dot-product attention (the default).", section="training"),
    "weighted_captions": Field("bool", False, "read prompt weights in training captions as sampling does: "
                               "(word:1.2), (word) ×1.1, [word] ÷1.1, \\( \\) literal brackets; each chunk's text-"
                               "encoder output is scaled by its tokens' weights and rescaled to its unweighted mean "
                               "(sd-scripts, A1111). Weighted groups must not contain caption_separator when "
                               "shuffling.", section="training"),
    "ema_decay": Field("float", None, "keep an exponential moving average of the trained weights with this "
                       "decay (e.g. 0.999) and save it instead of the raw weights; unset = off.",
                       minimum=0, maximum=1, section="training"),
    "validation_split": Field("float", 0.0, "share of training images held out for a validation loss at fixed "
                              "timesteps and noise (0 = none).", minimum=0, maximum=0.5, section="training"),
    "validate_every_n_steps": Field("int", None, "validation-loss interval (default: each save, and the end).",
                                    minimum=1, section="training"),
    "dynamo_backend": Field("str", "no", "sd-scripts' torch.compile backend (used there only with torch_compile). "
                            "pentadactyl does not compile the U-Net: \"no\" (any case, as kohya_ss writes it) is "
                            "accepted, any other backend is refused before the model loads.", section="training"),
}

SAVING_FIELDS: dict[str, Field] = {
    "metadata_title": Field("str", None, "modelspec.title of the saved file (default: output_name).",
                            section="output"),
    "metadata_author": Field("str", None, "modelspec.author of the saved file.", section="output"),
    "metadata_description": Field("str", None, "modelspec.description of the saved file.", section="output"),
    "metadata_license": Field("str", None, "modelspec.license of the saved file.", section="output"),
    "metadata_tags": Field("str", None, "modelspec.tags of the saved file (comma-separated).", section="output"),
    "save_model_as": Field("str", "safetensors", "file format of the trained weights.", choices=("safetensors",),
                           section="output"),
    "save_precision": Field("str", "fp16", "dtype of saved weights: fp16, bf16 or float (fp32).",
                            choices=("fp16", "bf16", "float"), section="output"),
    "save_every_n_epochs": Field("int", None, "also save after every N epochs (0 = never, as kohya_ss writes it).",
                                 minimum=1, unset=(0,), section="output"),
    "save_every_n_steps": Field("int", None, "also save every N steps (0 = never).", minimum=1, unset=(0,),
                                section="output"),
    "save_last_n_epochs": Field("int", None, "keep only the N newest per-epoch files (0 = keep all).", minimum=1,
                                unset=(0,), section="output"),
    "save_last_n_steps": Field("int", None, "keep only the per-step files of the last N steps (0 = keep all).",
                               minimum=1, unset=(0,),
                               section="output"),
    "save_state": Field("bool", False, "also save the full training state (for resume) with each save.",
                        section="output"),
    "save_state_on_train_end": Field("bool", False, "save the training state at the end.", section="output"),
    "resume": Field("path", None, "state folder to resume from (written by save_state or an interrupt).",
                    section="output"),
    "no_metadata": Field("bool", False, "write no ss_* training metadata at all.", section="output"),
    "no_dataset_metadata": Field("bool", False, "leave out dataset-revealing metadata (folder names, tag "
                                 "frequencies, bucket info).", section="output"),
    "training_comment": Field("str", None, "free text stored as ss_training_comment.", section="output"),
    "logging_dir": Field("path", None, "write TensorBoard logs here (loss, lr, grad norm, samples).",
                         section="output"),
    "log_prefix": Field("str", None, "prefix of the TensorBoard run folder name.", section="output"),
    "log_with": Field("str", "tensorboard", "logger used with logging_dir (\"\" = the default).",
                      choices=("tensorboard",), unset=("",),
                      section="output"),
}

SAMPLING_DURING_TRAINING_FIELDS: dict[str, Field] = {
    "sample_prompts": Field("path", None, "prompt file (.txt/.toml/.json, sd-scripts syntax) sampled during "
                            "training.", section="sampling"),
    "sample_every_n_steps": Field("int", None, "sample every N steps (0 = never).", minimum=1, unset=(0,),
                                  section="sampling"),
    "sample_every_n_epochs": Field("int", None, "sample after every N epochs (0 = never).", minimum=1, unset=(0,),
                                   section="sampling"),
    "sample_at_first": Field("bool", False, "sample before training starts.", section="sampling"),
    "sample_sampler": Field("str", "ddim", "sampler of in-training samples (sd-scripts or A1111 names).",
                            section="sampling"),
}

NETWORK_FIELDS: dict[str, Field] = {
    "network_module": Field("str", "networks.lora", "the network type: networks.lora (LoRA, and LoCon when "
                            "conv_dim is given in network_args), networks.locon (the same module; conv_dim required) "
                            "or lycoris.kohya (LyCORIS' LoRA/LoCon, LoHa, LoKr, (IA)^3 and DoRA, chosen by algo= "
                            "in network_args; needs pip install lycoris-lora).",
                            choices=("networks.lora", "networks.locon", "lycoris.kohya"), section="network"),
    "network_dim": Field("int", 4, "rank of the LoRA modules.", minimum=1, section="network"),
    "network_alpha": Field("float", 1.0, "alpha: the update is scaled by alpha / rank.", minimum=0,
                           section="network"),
    "network_args": Field("list[str]", None, "extra network settings as \"key=value\": conv_dim, conv_alpha, "
                          "text_encoder_dim, text_encoder_alpha, preset, dropout, rank_dropout, module_dropout, "
                          "block_dims, block_alphas, conv_block_dims, conv_block_alphas; with lycoris.kohya: algo "
                          "(lora, locon, loha, lokr, ia3), conv_dim, conv_alpha, preset, dropout, rank_dropout, "
                          "module_dropout, bypass_mode, use_tucker, use_scalar, dora_wd, wd_on_output, rs_lora, "
                          "factor, decompose_both, full_matrix, unbalanced_factorization.", section="network"),
    "network_dropout": Field("float", None, "neuron dropout of the LoRA down output.", minimum=0, maximum=1,
                             section="network"),
    "network_weights": Field("path", None, "start from these LoRA weights (same shapes).", section="network"),
    "network_train_unet_only": Field("bool", False, "train only the U-Net part.", section="network"),
    "network_train_text_encoder_only": Field("bool", False, "train only the text-encoder part.", section="network"),
    "unet_lr": Field("float", None, "learning rate of the U-Net part (default learning_rate; 0 = frozen).",
                     minimum=0, section="network"),
    "text_encoder_lr": Field("float", None, "learning rate of the text-encoder part (default learning_rate; "
                             "0 = frozen).", minimum=0, section="network"),
    "scale_weight_norms": Field("float", None, "max-norm regularisation (sd-scripts'): after each optimizer step, "
                                "every LoRA module whose weight change alpha/rank · up·down has a Frobenius norm "
                                "above this is scaled down to exactly this norm (1.0 is typical); the modules "
                                "scaled and the mean and max norm are logged (max_norm/… in TensorBoard). "
                                "Unset or 0 = off.", minimum=0, section="network"),
}

MAX_VECTORS = 75  # one CLIP chunk

TEXTUAL_INVERSION_FIELDS: dict[str, Field] = {
    "token_string": Field("str", None, "the new prompt token, e.g. \"<handpalm>\"; it must not be a word CLIP "
                          "already knows. Several vectors add token1, token2, ….", nullable=False,
                          section="textual_inversion"),
    "init_word": Field("str", None, "word(s) whose token vectors start the embedding, e.g. \"hand\" or "
                       "\"open palm\"; one vector per token, repeated when num_vectors_per_token is larger. "
                       "Unset: the mean of all token vectors.", section="textual_inversion"),
    "num_vectors_per_token": Field("int", None, "vectors of the embedding (default: as many as init_word has "
                                   "tokens, at least 1; with weights: as many as the file has).", minimum=1,
                                   maximum=MAX_VECTORS, section="textual_inversion"),
    "use_object_template": Field("bool", False, "images without a caption file get object captions "
                                 "(\"a photo of a <token>\", …); the default. Unlike sd-scripts, images with "
                                 "a caption file keep their caption.", section="textual_inversion"),
    "use_style_template": Field("bool", False, "images without a caption file get style captions "
                                "(\"a painting in the style of <token>\", …).", section="textual_inversion"),
    "weights": Field("path", None, "start from this embedding file (.safetensors / A1111 .pt / diffusers .bin), "
                     "e.g. to continue training it.", section="textual_inversion"),
    "contrastive_data_dir": Field("path", None, "contrastive mode: a folder of GOOD images. The embedding learns "
                                  "to explain the training (bad) images better than these, by a margin, so that "
                                  "as a negative it targets the flaw, not the subject.", section="textual_inversion"),
    "contrastive_margin": Field("float", 0.1, "contrastive mode: required gap m of ln(loss on good) − ln(loss on "
                                "bad); 0.1 ≈ the good images' loss at least 10% higher.", minimum=0,
                                section="textual_inversion"),
    "contrastive_weight": Field("float", 1.0, "contrastive mode: weight λ of the hinge term.", minimum=0,
                                section="textual_inversion"),
}

TI_SAVING_FIELDS: dict[str, Field] = {
    **SAVING_FIELDS,
    "save_model_as": Field("str", "safetensors", "embedding file format: safetensors ({\"emb_params\": [n, 768]}, "
                           "read by A1111, ComfyUI, sd-scripts, diffusers) or pt (A1111's layout).",
                           choices=("safetensors", "pt"), section="output"),
}

DREAMBOOTH_FIELDS: dict[str, Field] = {
    "dreambooth_mode": Field("str", "lora", "lora: a LoRA network (network_* keys) saved as a LoRA file; full: "
                             "fine-tune the U-Net (and text encoder) and save a single-file checkpoint.",
                             choices=("lora", "full"), section="dreambooth"),
    "class_prompt": Field("str", None, "prompt of the class images, e.g. \"a photo of hand\": used to generate "
                          "them and as the caption of class images without a caption file (default: each is_reg "
                          "subset's class_tokens).", section="dreambooth"),
    "num_class_images": Field("int", 0, "images each is_reg folder should hold; missing ones are generated with the "
                              "base model at class_prompt (0 = use the folders as they are).", minimum=0,
                              section="dreambooth"),
    "class_negative_prompt": Field("str", "", "negative prompt of generated class images.", section="dreambooth"),
    "class_image_steps": Field("int", 30, "sampling steps per generated class image.", minimum=1, section="dreambooth"),
    "class_image_cfg_scale": Field("float", 7.5, "CFG scale of generated class images.", minimum=0,
                                   section="dreambooth"),
    "class_image_sampler": Field("str", "ddim", "sampler of generated class images (sd-scripts or A1111 names).",
                                 section="dreambooth"),
    "class_image_batch_size": Field("int", 4, "class images generated per batch.", minimum=1, section="dreambooth"),
    "stop_text_encoder_training": Field("int", None, "train the text encoder (network part or full) only until this "
                                        "step; unset: the whole run; 0 or -1: never.", section="dreambooth"),
    "save_diffusers_folder": Field("bool", False, "full mode: also write the final model as a diffusers folder "
                                   "(output_dir/output_name/, float32).", section="output"),
}
