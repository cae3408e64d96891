"""Job keys every script shares (the model, the output), and the dataset-file key of the training scripts."""

from __future__ import annotations

from library.schema import Field

MODEL_FIELDS: dict[str, Field] = {
    "pretrained_model_name_or_path": Field(
        "path", help="SD1.x checkpoint: a single .safetensors/.ckpt file (LDM layout) or a diffusers folder.",
        nullable=False, section="model"),
    "vae": Field("path", None, "a separate VAE that replaces the checkpoint's own (for caching latents, samples "
                 "and a saved full model): a single file such as vae-ft-mse-840000-ema-pruned.safetensors, or a "
                 "diffusers VAE folder.", section="model"),
    "clip_skip": Field("int", 1, "use the output of the N-th last CLIP layer (1 = last, 2 = anime models).",
                       minimum=1, maximum=12, section="model"),
    "max_token_length": Field("int", 75, "caption length in tokens: 75, 150 or 225 (chunks of 75, as A1111); "
                              "sample prompts are never cut, as in WebUI.",
                              choices=(75, 150, 225), section="model"),
    "seed": Field("int", 42, "random seed of the whole run (initialisation, noise, shuffling).", section="model"),
}

OUTPUT_FIELDS: dict[str, Field] = {
    "output_dir": Field("path", "output", "folder for the trained files.", section="output"),
    "output_name": Field("str", None, "base name of the files written (default: the job file's name).",
                         section="output"),
}

DATASET_FILE_FIELD: dict[str, Field] = {
    "dataset_config": Field("path", None, "a dataset TOML ([general], [[datasets]], [[datasets.subsets]]); "
                            "or put those tables in the job itself, or use train_data_dir.", section="dataset"),
}
