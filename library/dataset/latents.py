"""Pixels and latents: a sample's image decoded and cropped, the loader threads, and where each
image's latents come from (the cache, in memory or beside the image, or the VAE as batches are drawn).

Latents leave here multiplied by the VAE's scaling_factor; the cache holds them unscaled, as the disk
files do (see cache.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from library.dataset.cache import CacheKey, cache_path, encode_pixels, read_cache, vae_identity, write_cache
from library.dataset.config import DatasetConfig
from library.dataset.images import BadImageError, color_augment, load_rgb, resize_and_crop, to_tensor
from library.dataset.plan import SampleDraws, centred_draws
from library.dataset.sources import ImageEntry
from library.errors import DatasetError
from library.fileio import WRITE_ERRORS, write_error_reason

log = logging.getLogger("pentadactyl.dataset")

Latents = tuple[torch.Tensor, Optional[torch.Tensor]]  # (latent, mirrored latent or None), unscaled


class Loader:
    """Threads that decode images while the VAE or the training step works; without workers the jobs
    run where they are started."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def start(self, jobs: Sequence[Callable]) -> list:
        """Start `jobs`; `gather` their results. An unreadable image's BadImageError is returned as the
        result (the caller reports it per file), not raised from a thread."""
        def safe(job):
            try:
                return job()
            except BadImageError as exc:
                return exc
        if self.pool is None:
            return [safe(j) for j in jobs]
        return [self.pool.submit(safe, j) for j in jobs]

    @staticmethod
    def gather(started: list) -> list:
        return [f.result() if isinstance(f, Future) else f for f in started]

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=cancel)


class LatentStore:
    """The latents of a dataset's images (by entry index): those cached, and the VAE for the rest."""

    def __init__(self, configs: Sequence[DatasetConfig], entries: Sequence[ImageEntry]) -> None:
        self.configs = configs
        self.entries = entries
        self.cached: dict[int, Latents] = {}
        self.encoder: tuple[torch.nn.Module, torch.device | str, torch.dtype] | None = None
        self.scaling_factor: float | None = None

    def pixels(self, e: ImageEntry, draws: SampleDraws, also_flipped: bool = False) -> list[torch.Tensor]:
        """The sample's crop as [3, H, W] in [-1, 1] (and its mirror image when asked)."""
        img = load_rgb(e.path, self.configs[e.dataset].max_image_pixels, min_size=e.choice.resized)
        img = resize_and_crop(img, e.choice.resized, e.choice.bucket, draws.crop)
        if draws.hue_shift:
            img = color_augment(img, draws.hue_shift)
        out = [to_tensor(img, draws.flip)]
        if also_flipped:
            out.append(to_tensor(img, not draws.flip))
        return out

    def unreadable(self, indices: Sequence[int], workers: int) -> list[tuple[int, str]]:
        """(index, message) of the entries whose image cannot be decoded in full."""
        bad = []
        loader = Loader(workers)
        try:
            with tqdm(total=len(indices), desc="checking images", unit="img", disable=not indices) as bar:
                for start in range(0, len(indices), 16):
                    chunk = indices[start:start + 16]
                    jobs = [lambda e=self.entries[i]: load_rgb(e.path, self.configs[e.dataset].max_image_pixels,
                                                               min_size=e.choice.resized).size for i in chunk]
                    for i, res in zip(chunk, loader.gather(loader.start(jobs))):
                        if isinstance(res, BadImageError):
                            bad.append((i, str(res)))
                    bar.update(len(chunk))
        finally:
            loader.close()
        return bad

    def use_vae(self, vae: torch.nn.Module, device: torch.device | str, dtype: torch.dtype,
                buckets: Iterable[tuple[int, int]]) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        for w, h in buckets:
            if w % factor or h % factor:
                raise DatasetError(f"bucket {w}×{h} is not a multiple of the VAE's {factor} pixels per latent; "
                                   f"use a bucket_reso_steps that is a multiple of {factor}.")
        self.encoder = (vae, device, dtype)
        self.scaling_factor = float(vae.config.scaling_factor)

    def cache(self, indices: Sequence[int], to_disk: bool, batch_size: int, workers: int) -> list[tuple[int, str]]:
        """Cache the latents of `indices` not cached yet (centre or fixed crop, and the mirror image with
        flip_aug): read from their disk files when `to_disk` and those match, else encoded (and written).
        Returns (index, message) of the images that could not be decoded."""
        vae = self.encoder[0]
        identity = vae_identity(vae) if to_disk else ""
        todo: dict[tuple[int, int], list[tuple[int, CacheKey]]] = defaultdict(list)
        hits = 0
        for i in indices:
            if i in self.cached:
                continue
            e = self.entries[i]
            flip = self.configs[e.dataset].subsets[e.subset].flip_aug
            key = CacheKey(e.file_size, e.mtime_ns, e.choice.bucket, e.choice.resized,
                           centred_draws(e.choice).crop, flip, identity)
            if to_disk:
                got = read_cache(cache_path(e.path), key)
                if got is not None:
                    self.cached[i] = got
                    hits += 1
                    continue
            todo[e.choice.bucket].append((i, key))
        # one bucket per VAE batch: the images of a batch must have one size
        chunks = [items[k:k + batch_size] for items in todo.values() for k in range(0, len(items), batch_size)]
        total = sum(len(c) for c in chunks)
        bad: list[tuple[int, str]] = []
        loader = Loader(workers)
        try:
            started = self._load_chunk(chunks[0], loader) if chunks else []
            with tqdm(total=total, desc="caching latents", unit="img", disable=total == 0) as bar:
                for n, chunk in enumerate(chunks):
                    pixels = loader.gather(started)
                    # the threads load the next chunk while the VAE encodes this one
                    started = self._load_chunk(chunks[n + 1], loader) if n + 1 < len(chunks) else []
                    self._encode_chunk(chunk, pixels, to_disk, bad)
                    bar.update(len(chunk))
        finally:
            loader.close()
        log.info("latents: %d encoded, %d read from the disk cache", total - len(bad), hits)
        return bad

    def _load_chunk(self, chunk: list[tuple[int, CacheKey]], loader: Loader) -> list:
        jobs = [lambda e=self.entries[i], key=key: self.pixels(e, centred_draws(e.choice), also_flipped=key.flipped)
                for i, key in chunk]
        return loader.start(jobs)

    def _encode_chunk(self, chunk: list[tuple[int, CacheKey]], pixels: list, to_disk: bool, bad: list) -> None:
        good = [(i, key, px) for (i, key), px in zip(chunk, pixels) if not isinstance(px, BadImageError)]
        bad += [(i, str(px)) for (i, _), px in zip(chunk, pixels) if isinstance(px, BadImageError)]
        if not good:
            return
        stacked = torch.stack([t for _, _, px in good for t in px])
        vae, device, dtype = self.encoder
        latents = encode_pixels(vae, stacked, device, dtype)
        k = 0
        for i, key, px in good:
            lat = latents[k]
            flipped = latents[k + 1] if key.flipped else None
            k += len(px)
            if not torch.isfinite(lat).all() or (flipped is not None and not torch.isfinite(flipped).all()):
                raise DatasetError(f"{self.entries[i].path}: the VAE returned NaN/inf latents for this image. This is "
                                   "usually the SD1.x VAE overflowing in half precision: encode in float32 "
                                   "(no_half_vae / a float32 VAE) or use a VAE fixed for fp16.")
            self.cached[i] = (lat, flipped)
            if to_disk:
                try:
                    write_cache(cache_path(self.entries[i].path), key, lat, flipped)
                except WRITE_ERRORS as exc:
                    raise DatasetError(f"{cache_path(self.entries[i].path)}: cannot write the latent cache "
                                       f"({write_error_reason(exc)}); "
                                       "make the image folder writable or set cache_latents_to_disk = false.") from None

    # ---- batches

    def attach(self, plans: Iterator[dict], workers: int) -> Iterator[dict]:
        """The batches of `plans` (from TrainDataset.batch_plan) with their "latents"; the threads load
        the next batch's uncached images while this one trains."""
        loader = Loader(workers)
        try:
            meta = next(plans, None)
            started = self._load_uncached(meta, loader) if meta is not None else []
            while meta is not None:
                pixels = loader.gather(started)
                nxt = next(plans, None)
                started = self._load_uncached(nxt, loader) if nxt is not None else []
                batch = {k: v for k, v in meta.items() if not k.startswith("_")}
                batch["latents"] = self._latents_for(meta, pixels)
                yield batch
                meta = nxt
        finally:
            loader.close(cancel=True)

    def _load_uncached(self, meta: dict, loader: Loader) -> list:
        jobs = [(lambda: None) if i in self.cached else (lambda e=self.entries[i], dr=dr: self.pixels(e, dr)[0])
                for i, dr in zip(meta["_entries"], meta["_draws"])]
        return loader.start(jobs)

    def _latents_for(self, meta: dict, pixels: list) -> torch.Tensor:
        for px in pixels:
            if isinstance(px, BadImageError):  # readable when checked, unreadable now: changed during the run
                raise DatasetError(f"{px} (it could be read when the run started).")
        missing = [k for k, px in enumerate(pixels) if px is not None]
        out: list[torch.Tensor | None] = [None] * len(pixels)
        if missing:
            vae, device, dtype = self.encoder
            encoded = encode_pixels(vae, torch.stack([pixels[k] for k in missing]), device, dtype)
            for k, lat in zip(missing, encoded):
                if not torch.isfinite(lat).all():
                    raise DatasetError(f"{meta['image_paths'][k]}: the VAE returned NaN/inf latents; encode in float32.")
                out[k] = lat
        for k, (i, dr) in enumerate(zip(meta["_entries"], meta["_draws"])):
            if out[k] is None:
                lat, flipped = self.cached[i]
                out[k] = flipped if dr.flip else lat
        return torch.stack(out) * self.scaling_factor
