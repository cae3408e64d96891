"""LoRA / LoCon training: the method behind train_network.py (and DreamBooth's LoRA mode)."""

from __future__ import annotations

from pathlib import Path

import torch

from library.job_types import NetworkJob
from library.schema import parse_key_values
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

    def __init__(self, job: NetworkJob):
        from networks import NetworkSpec

        self.job = job
        self.unet_lr, self.te_lr = part_learning_rates(job)
        args = parse_key_values(job.network_args, "network_args")
        if job.network_dropout is not None:
            args.setdefault("dropout", str(job.network_dropout))
        self.spec = NetworkSpec.from_args(job.network_dim, job.network_alpha, args,
                                          train_unet=self.unet_lr > 0, train_text_encoder=self.te_lr > 0)
        self.network = None

    @property
    def needs_text_encoder_grad(self) -> bool:
        return self.te_lr > 0

    def setup(self, ctx: TrainContext) -> list[dict]:
        from networks import create_network, load_network_file

        unet, text = ctx.model.unet, ctx.model.text_encoder
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
        return {k: v for k, v in self.network.kohya_state_dict().items() if not k.endswith(".alpha")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        full = self.network.kohya_state_dict()
        full.update(state)
        self.network.load_kohya_state_dict(full, strict=True, source="the training state")

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
        n = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        return (f"LoRA network: {len(self.network.locon)} modules, {n:,} trainable parameters "
                f"(dim {self.spec.network_dim}, alpha {self.spec.network_alpha}"
                + (f", conv {self.spec.conv_dim}/{self.spec.conv_alpha}" if self.spec.trains_conv else "") + ")")
