"""LoRA / LoCon training: the method behind train_network.py (and DreamBooth's LoRA mode).

`network_module = "networks.lora"` (the default) trains our LoCon network (networks/locon.py);
`network_module = "lycoris.kohya"` trains a LyCORIS network through the optional lycoris-lora package
(networks/lycoris_network.py), with the same keys, files, metadata and exact resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

from library.job_types import NetworkJob
from library.training.rules import network_args_of
from library.training.method import Method, TrainContext


def part_learning_rates(job: NetworkJob) -> tuple[float, float]:
    """(U-Net lr, text-encoder lr); 0 freezes a part."""
    unet_lr = job.learning_rate if job.unet_lr is None else job.unet_lr
    te_lr = job.learning_rate if job.text_encoder_lr is None else job.text_encoder_lr
    if job.network_train_unet_only:
        te_lr = 0.0
    if job.network_train_text_encoder_only:
        unet_lr = 0.0
    return unet_lr, te_lr


class NetworkMethod(Method):
    name = "network"
    saves_network = True
    half_token_embedding = True

    def __init__(self, job: NetworkJob):
        from networks import NetworkSpec
        from networks.lycoris_network import LYCORIS_MODULE, LycorisSpec, require_lycoris

        self.job = job
        self.unet_lr, self.te_lr = part_learning_rates(job)
        args = network_args_of(job.network_args, job.network_dropout, "network_args")
        self.lycoris = job.network_module == LYCORIS_MODULE
        if self.lycoris:
            require_lycoris()  # before the model loads
        self.spec = (LycorisSpec if self.lycoris else NetworkSpec).from_args(
            job.network_dim, job.network_alpha, args, train_unet=self.unet_lr > 0, train_text_encoder=self.te_lr > 0)
        self.network = None

    @property
    def needs_text_encoder_grad(self) -> bool:
        return self.te_lr > 0

    def setup(self, ctx: TrainContext) -> list[dict]:
        from networks import create_network, load_network_file

        unet, text = ctx.model.unet, ctx.model.text_encoder
        if self.lycoris:
            from networks.lycoris_network import LycorisKohyaNetwork

            self.network = LycorisKohyaNetwork(self.spec, unet, text, ctx.model.vae)
        else:
            self.network = create_network(self.spec, unet, text)
        if self.job.network_weights:
            tensors, _ = load_network_file(self.job.network_weights)
            self.network.load_kohya_state_dict(tensors, strict=True, source=str(self.job.network_weights))
        self.network.to(ctx.device)
        self.network.apply_to()
        return self.network.param_groups(self.unet_lr, self.te_lr)

    def modules(self) -> list[torch.nn.Module]:
        return [self.network]  # its dropout variants act in train mode only

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.lycoris:
            return self.network.trainable_state()
        return {k: v for k, v in self.network.kohya_state_dict().items() if not k.endswith(".alpha")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.lycoris:
            self.network.load_trainable_state(state)
            return
        full = self.network.kohya_state_dict()
        full.update(state)
        self.network.load_kohya_state_dict(full, strict=True, source="the training state")

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """scale_weight_norms after an optimizer step: (modules scaled, mean and max norm after scaling)."""
        if self.lycoris:
            return self.network.apply_max_norm(max_norm)
        from library.training.optimizers import apply_max_norm

        return apply_max_norm(self.network.modules_of(), max_norm)

    def save(self, path: Path, metadata: dict[str, str], dtype: torch.dtype, final: bool = False) -> list[Path]:
        from networks import save_network

        save_network(path, self.network.kohya_state_dict(), metadata, dtype,
                     include_dataset_metadata=not self.job.no_dataset_metadata)
        return [path]

    def metadata(self) -> dict[str, str]:
        meta = dict(self.spec.to_metadata())
        meta["ss_unet_lr"] = repr(self.unet_lr)
        meta["ss_text_encoder_lr"] = repr(self.te_lr)
        meta["ss_network_train_unet_only"] = str(self.te_lr == 0)
        meta["ss_network_train_text_encoder_only"] = str(self.unet_lr == 0)
        return meta

    def summary(self) -> str:
        if self.lycoris:
            return self.network.summary()
        n = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        return (f"LoRA network: {len(self.network.locon)} modules, {n:,} trainable parameters "
                f"(dim {self.spec.network_dim}, alpha {self.spec.network_alpha}"
                + (f", conv {self.spec.conv_dim}/{self.spec.conv_alpha}" if self.spec.trains_conv else "") + ")")
