"""Pretrain the toy hand model: a small SD1-architecture VAE, text encoder and U-Net that draw toy hands
about as badly as SD1.5 draws real ones. The shipped model is two runs of this script:

    python -m toy_hands.pretrain --out toy-stage1.safetensors
    python -m toy_hands.pretrain --init toy-stage1.safetensors --seed 1 --images 8000 \
        --five_finger_share 0.05 --wrong_counts extra --unet_steps 1200 --unet_batch 32 --lr 4e-4 \
        --save_every 0 --out toy_hands/toy-hands-sd1.safetensors

The first learns to draw hands (and its VAE) from a mix where half the hands have five digits; the
second, like a later crawl of worse pictures, leaves the VAE alone and tunes the U-Net and text encoder on
a mix where most hands have six or seven digits, so that the base model gets hands wrong most of the
time, as SD1.5 does. Each run's training set is a "web-like" mix: hands whose digit count is right only
`five_finger_share` of the time, the others going wrong as `--wrong_counts` says (captions never say how
many), plus a few non-hand objects. Its hands are in the "web" pose
(params.POSES): any tilt, but fingers never quite touching, so that a count survives the 16x16 latents
and the model can learn it as a count rather than as a blob. Everything follows from --seed:
the images, the initial weights, the batches and the noise, so on the same machine and thread count the
script writes the same file. Stages (each with a progress bar, all in one process):

1. VAE: three levels (64 px images -> 16x16x4 latents; SD1.5's four levels would leave 8x8 latents,
   too coarse for fingers two pixels wide), trained on L1 reconstruction with a small KL term, then
   rescaled exactly so that SD1's latent scale 0.18215 gives latents of unit variance.
2. Latents of every training image, encoded once.
3. U-Net and text encoder together, on SD1's ε-prediction objective with min-SNR-5 weighting and 10 %
   empty captions (for classifier-free guidance), with an EMA of the weights, which is what is saved.

With --init, the VAE stage is skipped (the given model's VAE is kept exactly, and encodes the latents)
and stage 3 starts from its U-Net and text encoder. The file is a single-file LDM checkpoint in fp16,
loadable by library.models.loading.load_sd1 like any SD1.5 file. Its metadata records the seed, the
steps and the wall time (and, after --init, the first run's record); the .log.json beside it holds
every logged step of both runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from library.models import architecture as arch
from library.errors import ModelLoadError
from library.models.loading import SD1Model, load_sd1, save_sd1_single_file
from library.models.tokenizer import load_tokenizer
from library.text_encoding import encode_token_chunks, tokenize_chunks
from library.evaluate.counter import count_fingers
from toy_hands.folder import render, sample_example
from toy_hands.params import POSES, WRONG_COUNTS, HandParams, caption_for, web_like_counts
from library.training.noise import add_noise, min_snr_weights, sd1_alphas_cumprod

TOY_VAE_CONFIG: dict = {
    **arch.SD15_VAE_CONFIG,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "sample_size": 64,
}
TOY_UNET_CONFIG: dict = {
    **arch.SD15_UNET_CONFIG,
    "sample_size": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
}
TOY_TEXT_CONFIG: dict = dict(arch.TINY_TEXT_CONFIG)

SCALING_FACTOR = arch.SD15_VAE_CONFIG["scaling_factor"]
IMAGE_SIZE = 64
DATA_SEED_OFFSET = 1000  # the training images' stream; held-out checks use other streams
CHECK_SEED_OFFSET = 2000
POSE = "web"  # the pretraining images' pose (params.POSES)


def render_set(seed: int, count: int, five_finger_share: float, object_share: float, pose: str = POSE,
               wrong: str = "near"):
    """uint8 images [N, 3, 64, 64], their captions and parameters."""
    images = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    captions, params = [], []
    counts = web_like_counts(five_finger_share, wrong)
    for i in tqdm(range(count), desc="rendering", unit="img", mininterval=2):
        p = sample_example(seed, i, counts=counts, object_share=object_share, pose=pose)
        images[i] = np.asarray(render(p, IMAGE_SIZE).convert("RGB")).transpose(2, 0, 1)
        captions.append(caption_for(p))
        params.append(p)
    return torch.from_numpy(images), captions, params


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def to_pil(x: torch.Tensor):
    from PIL import Image

    array = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, generator: torch.Generator, log: list):
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99))
    bar = tqdm(range(steps), desc="VAE", unit="step")
    for step in bar:
        set_lr(optimizer, lr_at(step, steps, lr, warmup=50))
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        x = to_unit(images[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(l1=f"{l1.item():.4f}")
            log.append({"stage": "vae", "step": step, "l1": round(l1.item(), 5), "kl": round(kl.item(), 5)})
    vae.eval()


@torch.no_grad()
def encode_means(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(images), batch), desc="encoding", unit="batch", mininterval=2):
        out.append(vae.encode(to_unit(images[start:start + batch])).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def rescale_latents(vae, means: torch.Tensor) -> float:
    """Scale the latent space by c (exactly: quant_conv's mean rows ×c, its log-variance rows + 2 ln c,
    post_quant_conv's input ÷c) so that latents × SCALING_FACTOR have unit standard deviation."""
    c = 1.0 / (SCALING_FACTOR * means.std().item())
    n = vae.config.latent_channels
    vae.quant_conv.weight[:n] *= c
    vae.quant_conv.bias[:n] *= c
    vae.quant_conv.bias[n:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


@torch.no_grad()
def vae_agreement(vae, seed: int, count: int, pose: str = POSE) -> dict:
    """How often the counter reads a VAE reconstruction as it reads the original (held-out hands)."""
    agree = five_kept = five = 0
    for i in range(count):
        p = sample_example(seed + CHECK_SEED_OFFSET, i, five_finger_share=0.5, pose=pose)
        original = render(p, IMAGE_SIZE).convert("RGB")
        x = to_unit(torch.from_numpy(np.asarray(original).transpose(2, 0, 1).copy())[None])
        recon = to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample[0])
        truth, seen = count_fingers(original), count_fingers(recon)
        agree += truth == seen
        if isinstance(p, HandParams) and p.well_formed:
            five += 1
            five_kept += seen == 5
    return {"images": count, "counter_agrees": agree / count, "five_read_as_five": five_kept / max(1, five)}


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.modules, self.decay = modules, decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.shadow, self.modules):
            for s, p in zip(shadow.parameters(), live.parameters()):
                s.lerp_(p.detach(), 1 - d)


def train_unet(model: SD1Model, latents: torch.Tensor, captions: list[str], steps: int, batch: int, lr: float,
               generator: torch.Generator, log: list, save_every: int, save) -> EMA:
    unet, text = model.unet.train(), model.text_encoder.train()
    ids = tokenize_chunks(model.tokenizer, captions)
    empty = tokenize_chunks(model.tokenizer, [""])
    alphas = sd1_alphas_cumprod()
    embedding = text.get_input_embeddings().weight
    groups = [{"params": list(unet.parameters()), "weight_decay": 1e-2},
              {"params": [p for p in text.parameters() if p is not embedding], "weight_decay": 1e-2},
              {"params": [embedding], "weight_decay": 0.0}]  # rows no caption uses must stay as they are
    optimizer = torch.optim.AdamW(groups, lr=lr)
    ema = EMA([unet, text], decay=0.995)
    bar = tqdm(range(steps), desc="U-Net + text encoder", unit="step")
    for step in bar:
        set_lr(optimizer, lr_at(step, steps, lr, warmup=100))
        idx = torch.randint(0, len(latents), (batch,), generator=generator)
        z0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(batch, generator=generator) < 0.1
        batch_ids[drop] = empty
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        zt = add_noise(z0, noise, t, alphas)
        states = encode_token_chunks(text, batch_ids)
        pred = unet(zt, t, states).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(t, alphas, 5.0)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        ema.update()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{per_sample.mean().item():.4f}")
            log.append({"stage": "unet", "step": step, "mse": round(per_sample.mean().item(), 5)})
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema, step + 1)
    unet.eval(), text.eval()
    return ema


def load_init(path: Path) -> tuple[SD1Model, dict]:
    """A toy model this script wrote, ready to train on (VAE frozen), and its pretraining record."""
    model = load_sd1(path)
    with safe_open(str(path), "pt") as f:
        record = (f.metadata() or {}).get("pentadactyl.toy_hands")
    if record is None:
        raise ModelLoadError(f"{path}: --init takes a toy hand model written by this script (its metadata has "
                             "no 'pentadactyl.toy_hands' record); pretrain one first without --init")
    model.vae.eval().requires_grad_(False)
    model.unet.requires_grad_(True)
    model.text_encoder.requires_grad_(True)
    init = json.loads(record)
    init["file"] = path.name
    return model, init


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the toy hand model (see the module docstring).")
    parser.add_argument("--out", default="toy_hands/toy-hands-sd1.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=24000)
    parser.add_argument("--five_finger_share", type=float, default=0.5)
    parser.add_argument("--wrong_counts", default="near", choices=sorted(WRONG_COUNTS),
                        help="how the other hands go wrong (params.WRONG_COUNTS)")
    parser.add_argument("--init", help="continue from this toy model (a file this script wrote): its VAE is kept "
                        "as it is and its U-Net and text encoder train on this run's images")
    parser.add_argument("--object_share", type=float, default=0.15)
    parser.add_argument("--vae_steps", type=int, default=1200)
    parser.add_argument("--vae_batch", type=int, default=16)
    parser.add_argument("--unet_steps", type=int, default=3000)
    parser.add_argument("--unet_batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--pose", default=POSE, choices=sorted(POSES), help="the hands' pose range (params.POSES)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check_images", type=int, default=200, help="held-out images of the VAE check")
    parser.add_argument("--save_every", type=int, default=250, help="also write the file every N U-Net steps")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    log: list[dict] = []
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model, init = load_init(Path(args.init)) if args.init else (None, None)
    images, captions, _ = render_set(args.seed + DATA_SEED_OFFSET, args.images, args.five_finger_share,
                                     args.object_share, args.pose, args.wrong_counts)
    if model is not None:
        vae = model.vae
        latents = encode_means(vae, images) * SCALING_FACTOR  # its latent scale is already folded in
        vae_check = init["vae_check"]
    else:
        vae = arch.build_vae(TOY_VAE_CONFIG)
        unet = arch.build_unet(TOY_UNET_CONFIG)
        text = arch.build_text_encoder(TOY_TEXT_CONFIG)
        model = SD1Model(unet, vae, text, load_tokenizer(), source="toy hands")
        train_vae(vae, images, args.vae_steps, args.vae_batch, 1e-3, generator, log)
        means = encode_means(vae, images)
        factor = rescale_latents(vae, means)
        latents = means * factor * SCALING_FACTOR
        vae_check = vae_agreement(vae, args.seed, args.check_images, args.pose)
        print(f"VAE: latent rescale ×{factor:.3f}; counter agrees on {vae_check['counter_agrees']:.1%} of "
              f"held-out reconstructions, five-finger hands kept {vae_check['five_read_as_five']:.1%}")
    vae_seconds = time.perf_counter() - started

    def save(ema: EMA, step: int, final: bool = False) -> None:
        ema_unet, ema_text = ema.shadow
        meta = {"pentadactyl.toy_hands": json.dumps({
            "seed": args.seed, "images": args.images, "five_finger_share": args.five_finger_share,
            "wrong_counts": args.wrong_counts, "object_share": args.object_share, "pose": args.pose,
            "vae_steps": 0 if init else args.vae_steps, "unet_steps": step, "unet_batch": args.unet_batch,
            "lr": args.lr, "threads": args.threads, "final": final,
            "wall_seconds": round(time.perf_counter() - started), "vae_check": vae_check, "init": init})}
        save_sd1_single_file(out, SD1Model(ema_unet, vae, ema_text, model.tokenizer, "toy hands"),
                             dtype=torch.float16, metadata=meta)

    ema = train_unet(model, latents, captions, args.unet_steps, args.unet_batch, args.lr, generator, log,
                     args.save_every, save)
    save(ema, args.unet_steps, final=True)
    wall = time.perf_counter() - started
    log_path = out.with_suffix(".log.json")
    record = {"args": vars(args), "vae_check": vae_check, "vae_seconds": round(vae_seconds),
              "wall_seconds": round(wall), "log": log}
    if args.init:  # the log of the run this one continued, so that one file tells the whole history
        init_log = Path(args.init).with_suffix(".log.json")
        record["init_log"] = json.loads(init_log.read_text()) if init_log.is_file() else None
    log_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {wall / 60:.1f} min")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
