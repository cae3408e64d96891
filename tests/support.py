"""What several test modules share: job files, the fixed-noise loss, an independent infotext parser, and the
rating page as a real server process driven by a headless Chromium (also used by bench/bench_rating_page.py).

Test modules import from here (`from support import ...`; pytest.ini puts tests/ and the repository root on
the path) and never from each other.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.schema import job_toml

REPO = Path(__file__).resolve().parent.parent

# 64-pixel single-bucket training: what every training test's [general] table says
SMALL_BUCKETS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64}


def write_job_file(folder: Path, keys: dict, subsets: list[dict] | None = None, general: dict | None = None,
                   name: str = "job.toml") -> Path:
    """`folder/job.toml` with `keys` at the top level (None values left out), `general` (SMALL_BUCKETS when
    there are subsets) and one dataset of `subsets`."""
    if general is None and subsets:
        general = SMALL_BUCKETS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(job_toml(keys, general, [{"subsets": subsets}] if subsets else None), encoding="utf-8")
    return path


def fixed_noise_loss(model, folder: Path, caption: str | None = None, network_file: Path | None = None) -> float:
    """Mean denoising loss over a folder's 64×64 images at fixed timesteps and noise.

    `caption`: used for every image instead of its caption file. `network_file`: a LoRA patched in at 1.0
    for the measurement (and removed afterwards).
    """
    from library.dataset import TrainDataset, resolve_datasets
    from library.sampling.networks import attach_networks, detach_networks, load_sampling_networks
    from library.text_encoding import encode_texts
    from library.training import noise as nz

    applied = load_sampling_networks([f"{network_file}:1.0"]) if network_file else []
    attach_networks(applied, ["patch"] * len(applied), model.unet, model.text_encoder)
    subset = {"image_dir": str(folder)}
    if caption is not None:
        subset.update(class_tokens=caption, caption_extension=".none")
    configs = resolve_datasets({"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
                               {"datasets": [{"subsets": [subset]}]}, "test", Path.cwd())
    data = TrainDataset(configs, seed=0)
    data.cache_latents(model.vae, "cpu", torch.float32)
    alphas, losses = nz.sd1_alphas_cumprod(), []
    with torch.no_grad():
        for n, batch in enumerate(data.batches(1)):
            for k in range(4):  # four fixed timesteps per image: a steadier estimate
                g = torch.Generator().manual_seed(100 * n + k)
                t = torch.tensor([50 + 250 * k])
                noise = torch.randn(batch["latents"].shape, generator=g)
                ctx = encode_texts(model.tokenizer, model.text_encoder, batch["captions"])
                pred = model.unet(nz.add_noise(batch["latents"], noise, t, alphas), t, encoder_hidden_states=ctx).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    detach_networks(applied)
    return sum(losses) / len(losses)


def write_job(tmp_path: Path, model: Path, images: Path, **keys) -> Path:
    """A small LoRA job on 64-pixel images (keys override the defaults); its outputs go to tmp_path/out."""
    base = {
        "pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"), "output_name": "lora",
        "network_dim": 4, "network_alpha": 4.0, "learning_rate": 2e-3, "max_train_steps": 8, "seed": 7,
        "train_batch_size": 2, "cache_latents": True, "optimizer_type": "AdamW", "save_precision": "float",
    }
    return write_job_file(tmp_path, {**base, **keys}, [{"image_dir": str(images)}])


def run_job(path: Path, **overrides):
    """Train the LoRA job at `path` in this process."""
    from library.config import load_job
    from library.training.loop import train
    from library.training.network_method import NetworkMethod

    job = load_job("train_network", config_path=str(path), overrides=overrides)
    return train(job, NetworkMethod(job))


# ------------------------------------------------------------------------- A1111 infotext, read back
# Written here, independently of library/sampling/infotext.py's writer: a PNG's text must parse back to
# the settings that made it.
_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {field: value}) of an A1111 `parameters` text."""
    *head, last = text.strip().split("\n")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    fields = {}
    for key, value in _PARAM.findall(last):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields


def parse_hash_list(value: str) -> dict[str, str]:
    """`name: hash, name: hash` (A1111's Lora/TI hashes) as a dict."""
    return dict(item.split(": ") for item in value.split(", "))


# ------------------------------------------------------------------ the rating page: server and browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class Server:
    """`evaluate.py serve` as a real process on a free port."""

    def __init__(self, db: Path, *extra: str):
        self.log = open(db.with_suffix(".serve.log"), "a")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "evaluate.py"), "serve", "--db", str(db), "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO)
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else ""
        assert "open http://127.0.0.1:" in line, f"server did not start: {line!r}"
        self.url = line.split("open ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict | bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(raw)
        return response.status, raw

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process.stdout.close()
        self.log.close()


def browser(tmp_path: Path, name: str):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    if not (shutil.which(CHROMIUM) and Path(CHROMEDRIVER).exists()):
        pytest.skip("Chromium and chromium-driver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={tmp_path / name}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_ready(driver, previous: str | None = None, timeout: float = 20) -> str:
    """Wait until the page shows an image other than `previous` and accepts keys; its URL."""
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        state = d.execute_script("return [document.body.dataset.state, "
                                 "document.getElementById('picture').dataset.image || null]")
        return state[1] if state[0] == "ready" and state[1] != previous else False

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(shown)


def press(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.TAG_NAME, "body").send_keys(key)


def sign_in(driver, url: str, rater: str) -> str:
    from selenium.webdriver.common.by import By

    driver.get(url)
    field = driver.find_element(By.ID, "rater-input")
    field.clear()
    field.send_keys(rater)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    return wait_ready(driver)


def open_as(driver, url: str, rater: str) -> str:
    """The page at `url?rater=NAME`: it starts without asking (a new port is a new origin: no stored name)."""
    driver.get(f"{url}?rater={rater}")
    return wait_ready(driver)


def write_tiny_clip(folder: Path) -> Path:
    """A random CLIP model with 32-wide towers, the shipped SD1 tokenizer and a CLIP image processor, saved to
    `folder` as a transformers folder (what `evaluate.py metrics --clip` and `--backbone` read)."""
    from transformers import CLIPConfig, CLIPModel

    from library.models.tokenizer import load_tokenizer

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255}))
    return folder
