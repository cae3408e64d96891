"""Time `evaluate.py metrics` per 100 images on this machine, with random weights (the cost, not the values).

    python bench/bench_evaluate_metrics.py            # tiny CLIP, CLIP ViT-L/14-shaped, FID Inception, FID maths
    python bench/bench_evaluate_metrics.py --quick    # tiny CLIP and the FID maths only

Images are 512 × 512 like SD1 samples. The ViT-L/14 model has the shape of openai/clip-vit-large-patch14
(random weights: the time of a forward pass does not depend on them).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image


def clip_seconds(config, images: int, batch: int) -> float:
    from transformers import CLIPImageProcessorPil, CLIPModel

    from library.evaluate.metrics import clip_scores
    from library.models.tokenizer import load_tokenizer

    size = config.vision_config.image_size
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tokenizer = load_tokenizer()
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(images)]
    prompts = ["a photo of a hand with five fingers, detailed, sharp focus"] * images
    clip_scores(model, tokenizer, processor, pics[:1], prompts[:1], "cpu")  # warm-up
    start = time.perf_counter()
    for i in range(0, images, batch):
        clip_scores(model, tokenizer, processor, pics[i:i + batch], prompts[i:i + batch], "cpu")
    return (time.perf_counter() - start) / images * 100


def inception_seconds(images: int, batch: int) -> float:
    from library.evaluate.inception import FidInceptionV3

    model = FidInceptionV3().eval()
    x = torch.randint(0, 256, (batch, 3, 512, 512), dtype=torch.uint8)
    with torch.no_grad():
        model(x[:1])
        start = time.perf_counter()
        for _ in range(0, images, batch):
            model(x)
    return (time.perf_counter() - start) / (images // batch * batch) * 100


def main() -> None:
    from transformers import CLIPConfig

    from library.evaluate.metrics import frechet_distance, kernel_inception_distance

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    tiny = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                      vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    print(f"CLIP score, tiny random CLIP (32-wide, 32 px): {clip_seconds(tiny, 100, 16):.2f} s per 100 images")
    if not args.quick:
        large = CLIPConfig(
            text_config=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16), projection_dim=768)
        print(f"CLIP score, CLIP ViT-L/14 shape: {clip_seconds(large, 16, 8):.1f} s per 100 images (16 timed)")
        print(f"FID Inception-v3 features, 512 px: {inception_seconds(16, 8):.1f} s per 100 images (16 timed)")
    rng = np.random.default_rng(0)
    for n in (1000, 5000):
        a, b = rng.normal(size=(n, 2048)), rng.normal(size=(n, 2048)) + 0.1
        start = time.perf_counter()
        frechet_distance(a, b)
        fid = time.perf_counter() - start
        start = time.perf_counter()
        kernel_inception_distance(a, b)
        kid = time.perf_counter() - start
        print(f"FID maths {n} vs {n} images × 2048: {fid:.1f} s; KID (100 subsets of 1000): {kid:.1f} s")


if __name__ == "__main__":
    main()
