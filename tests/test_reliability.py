"""Faults a user meets: a changed dataset or damaged state on resume, an unwritable or full output folder,
two runs in one folder, what a kill -9 leaves behind, command-line overrides, long captions, typos.

Each test checks the message the user sees and what was kept on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.cli import job_from_command_line
from library.config import load_job
from library.errors import ConfigError
from library.fileio import FolderLock
from library.toy_data import write_shape_folder
from library.training.loop import SaveFailed

from support import run_job, write_job

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, tiny_single_file, shapes_dir):
    """A state after 5 of 8 steps (8 images, batch 2: 4 batches an epoch, so mid-epoch 2); copy before changing."""
    root = tmp_path_factory.mktemp("saved")
    result = run_job(write_job(root, tiny_single_file, shapes_dir, max_train_steps=5, save_state_on_train_end=True))
    return result.state_dir


@pytest.fixture
def state_copy(saved_state, tmp_path):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    return Path(shutil.copytree(saved_state, out / "lora-state"))


@pytest.fixture
def no_hang():
    """Fail, instead of spinning forever, when the code under test does not return within 120 s."""
    def expired(signum, frame):
        raise AssertionError("timed out: the code under test hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- resume ------------------------------------------------------------------------------------------


def test_resume_with_fewer_batches_per_epoch_says_what_changed(tmp_path, tiny_single_file, shapes_dir, state_copy,
                                                              no_hang):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, train_batch_size=4, resume=str(state_copy))
    with pytest.raises(ConfigError) as caught:
        run_job(job)
    message = str(caught.value)
    assert "4 batches of 2 images per epoch" in message and "this run has 2 batches of 4 per epoch" in message
    assert "train_batch_size" in message and "Restore them to resume exactly" in message


def test_resume_of_an_older_state_past_the_new_epoch_end_is_refused(tmp_path, tiny_single_file, shapes_dir,
                                                                     state_copy, no_hang):
    """States written before the epoch shape was recorded: the hang came from a position past the epoch's end."""
    progress = json.loads((state_copy / "progress.json").read_text())
    for key in ("batches_per_epoch", "batches_per_step", "batch_size"):
        del progress[key]
    progress["batches_done_in_epoch"] = 3
    (state_copy / "progress.json").write_text(json.dumps(progress))
    job = write_job(tmp_path, tiny_single_file, shapes_dir, train_batch_size=4, resume=str(state_copy))
    with pytest.raises(ConfigError, match=r"3 batches of epoch 2 were already done; this run has 2 batches"):
        run_job(job)


def test_a_resume_with_other_processes_but_the_same_global_batch_is_accepted():
    """2 processes × 1 accumulation step consume the same batches per step as 1 × 2: the position holds."""
    from library.training.state import check_position_fits
    from library.training.state import Progress

    saved = Progress(global_step=3, epoch=1, batches_done_in_epoch=2, num_processes=2, seed=7, method="network",
                     batches_per_epoch=4, batches_per_step=2, batch_size=2)
    check_position_fits(saved, "state", batches_per_epoch=4, batches_per_step=2, batch_size=2, world=1)
    with pytest.raises(ConfigError, match=r"2 batches per optimizer step \(2 process\(es\)\); this run has 4 "
                                          r"batches of 2 per epoch, 1 per step \(1 process\(es\)\)"):
        check_position_fits(saved, "state", batches_per_epoch=4, batches_per_step=1, batch_size=2, world=1)


def test_resume_with_another_seed_is_refused(tmp_path, tiny_single_file, shapes_dir, state_copy):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, seed=8, resume=str(state_copy))
    with pytest.raises(ConfigError, match=r"saved by a run with seed = 7, this job has seed = 8.*set seed = 7"):
        run_job(job)


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class _RunsCode:
    """What a malicious optimizer.pt would hold: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage, expected", [
    (lambda s: _cut(s / "trainable.safetensors"), r"trainable\.safetensors is damaged .*cannot be resumed"),
    (lambda s: _cut(s / "optimizer.pt"),
     r"optimizer\.pt: the training-state file is truncated .*; this state cannot be resumed"),
    (lambda s: _cut(s / "progress.json"), r"progress\.json is damaged .*cannot be resumed"),
    (lambda s: (s / "progress.json").write_text('{"version": 1, "global_step": 5}'),
     r"progress\.json is incomplete or damaged \(it lacks epoch, batches_done_in_epoch"),
    (lambda s: (s / "scheduler.pt").write_bytes(b""),
     r"scheduler\.pt: the training-state file is empty \(0 bytes\); this state cannot be resumed"),
    (lambda s: (s / "rng.pt").unlink(), r"not a training-state folder \(missing rng\.pt\)"),
], ids=["trainable-truncated", "optimizer-truncated", "progress-cut", "progress-incomplete", "scheduler-empty",
        "rng-missing"])
def test_damaged_state_names_the_file_and_keeps_the_folder(tmp_path, tiny_single_file, shapes_dir, state_copy,
                                                           damage, expected):
    damage(state_copy)
    before = sorted(p.name for p in state_copy.iterdir())
    job = write_job(tmp_path, tiny_single_file, shapes_dir, resume=str(state_copy))
    with pytest.raises(ConfigError, match=expected) as caught:
        run_job(job)
    assert str(state_copy) in str(caught.value)
    assert sorted(p.name for p in state_copy.iterdir()) == before  # nothing was deleted or rewritten


def test_malicious_optimizer_state_is_refused_without_running_it(tmp_path, tiny_single_file, shapes_dir, state_copy):
    marker = tmp_path / "ran"
    torch.save({"state": {}, "param_groups": [_RunsCode(marker)]}, state_copy / "optimizer.pt")
    job = write_job(tmp_path, tiny_single_file, shapes_dir, resume=str(state_copy))
    with pytest.raises(ConfigError) as caught:
        run_job(job)
    message = str(caught.value)
    assert "optimizer.pt" in message and "system" in message and "Nothing was executed" in message
    assert "weights_only" not in message and "\x1b[" not in message
    assert not marker.exists()


# ---- the output folder ---------------------------------------------------------------------------------


def test_output_dir_that_cannot_be_created_is_refused_before_the_model_loads(tmp_path, shapes_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    job = write_job(tmp_path, tmp_path / "no-model.safetensors", shapes_dir, output_dir=str(blocker / "out"))
    with pytest.raises(ConfigError, match=r"output_dir = \".*a-file/out\": cannot write there \(a file of that name"):
        run_job(job)  # the missing model would be reported later: the folder is checked first


def test_read_only_output_dir_is_refused_at_start(tmp_path, shapes_dir, monkeypatch):
    import library.fileio as fileio

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    job = write_job(tmp_path, tmp_path / "no-model.safetensors", shapes_dir)
    with pytest.raises(ConfigError, match=r"output_dir = .*cannot write there \(Read-only file system\)"):
        run_job(job)


def _disk_full_for(monkeypatch, name_part: str) -> None:
    """safetensors reports a full disk as a SafetensorError; make writes of files named like `name_part` fail so."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if name_part in Path(filename).name:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_full_disk_at_the_final_save_keeps_the_state_and_resume_writes_the_weights(tmp_path, tiny_single_file,
                                                                                   shapes_dir, monkeypatch):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=3)
    _disk_full_for(monkeypatch, ".lora.safetensors.")
    with pytest.raises(SaveFailed) as caught:
        run_job(job)
    out = tmp_path / "out"
    message = str(caught.value)
    assert message.startswith(f"could not write {out / 'lora.safetensors'}: No space left on device.")
    assert f"--resume {out / 'lora-state'}" in message
    assert sorted(p.name for p in out.iterdir()) == ["lora-state"]  # no temporary, no lock left behind
    monkeypatch.undo()
    resumed = run_job(job, resume=str(out / "lora-state"))
    assert resumed.losses == [] and resumed.global_step == 3  # nothing trained again
    assert (out / "lora.safetensors").is_file()


def test_full_disk_for_weights_and_state_says_both(tmp_path, tiny_single_file, shapes_dir, monkeypatch):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=2)
    _disk_full_for(monkeypatch, "safetensors")
    monkeypatch.setattr("library.training.state.save_file",
                        __import__("safetensors.torch", fromlist=["save_file"]).save_file)
    with pytest.raises(SaveFailed, match=r"No space left on device\. The training state could not be saved either"):
        run_job(job)


def test_full_disk_while_caching_latents_to_disk_names_the_cache_file(tmp_path, tiny_single_file, monkeypatch):
    from library.dataset.cache import CACHE_SUFFIX
    from library.errors import DatasetError

    folder = tmp_path / "images"
    write_shape_folder(folder, count=2, size=(64, 64), seed=1, shapes=("circle",), colours=("red",))
    _disk_full_for(monkeypatch, CACHE_SUFFIX)
    with pytest.raises(DatasetError, match=rf"{CACHE_SUFFIX}: cannot write the latent cache \(No space left on "
                                           r"device\); make the image folder writable"):
        run_job(write_job(tmp_path, tiny_single_file, folder, cache_latents_to_disk=True))
    assert not list(folder.glob(f".*{CACHE_SUFFIX}*")) and not list(folder.glob(f"*{CACHE_SUFFIX}"))


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_with_the_first_ones_pid(tmp_path, tiny_single_file,
                                                                              shapes_dir):
    job = write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=2)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from library.fileio import FolderLock\n"
        "with FolderLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"), str(out)], cwd=REPO,
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, str(REPO / "train_network.py"), "--config", str(job)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is in use by another run (pid {holder.pid} on " in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "lora.safetensors").exists()
    # the holder was killed: its lock file stays behind, stale, and does not block the next run
    assert (out / FolderLock.NAME).is_file()
    run_job(job)
    assert (out / "lora.safetensors").is_file() and not (out / FolderLock.NAME).exists()


def test_leftovers_of_a_kill_during_saves_are_cleaned_and_the_state_recovered(tmp_path, tiny_single_file, shapes_dir,
                                                                              saved_state):
    out = tmp_path / "out"
    out.mkdir()
    # kill -9 while writing the weights: a full-size hidden temporary; between the state's two renames: the
    # finished new state under its temporary name and the previous one as .old, no lora-state at all
    (out / ".lora.safetensors.k2j4x9q1.tmp").write_bytes(b"\0" * 4096)
    shutil.copytree(saved_state, out / ".lora-state.old")
    shutil.copytree(saved_state, out / ".lora-state.ab3de_f9")
    (out / ".lora-state.old" / "progress.json").write_text(
        (saved_state / "progress.json").read_text().replace('"global_step": 5', '"global_step": 4'))
    result = run_job(write_job(tmp_path, tiny_single_file, shapes_dir, resume=str(out / "lora-state")))
    assert result.global_step == 8 and len(result.losses) == 3  # resumed from step 5: the newer state won
    assert sorted(p.name for p in out.iterdir()) == ["lora-state", "lora.safetensors"]


# ---- the job ---------------------------------------------------------------------------------------------


def test_command_line_dataset_keys_win_over_every_dataset_table(tmp_path, shapes_dir, capsys):
    job = tmp_path / "job.toml"
    job.write_text("\n".join([
        'pretrained_model_name_or_path = "model.safetensors"', "resolution = 64",
        "[general]", "resolution = 64", "min_bucket_reso = 64", "max_bucket_reso = 256",
        "[[datasets]]", "batch_size = 2", "[[datasets.subsets]]", f"image_dir = {json.dumps(str(shapes_dir))}",
        'caption_extension = ".txt"']) + "\n")
    argv = ["--config", str(job), "--resolution", "128", "--train_batch_size", "3", "--caption_extension", ".cap"]
    [dataset] = load_job("train_network", argv).datasets
    assert dataset.resolution == (128, 128) and dataset.batch_size == 3
    assert dataset.subsets[0].caption_extension == ".cap"
    with pytest.raises(SystemExit):
        job_from_command_line("train_network", argv + ["--print_config"])
    printed = capsys.readouterr().out
    job_part, dataset_part = printed.split("# datasets (resolved)\n")
    assert "resolution = 128" in job_part and "train_batch_size = 3" in job_part
    [shown] = json.loads("\n".join(line[2:] for line in dataset_part.splitlines()))
    assert shown["resolution"] == [128, 128] and shown["batch_size"] == 3
    assert shown["subsets"][0]["caption_extension"] == ".cap"


def test_optimizer_typo_is_reported_before_the_model_loads(tmp_path, shapes_dir):
    job = write_job(tmp_path, tmp_path / "no-model.safetensors", shapes_dir, optimizer_type="AdamW8bt")
    with pytest.raises(ConfigError, match=r"optimizer_type = \"AdamW8bt\" is unknown. Did you mean 'AdamW8bit'\?"):
        run_job(job)


def test_long_captions_get_one_warning_of_ours_and_none_of_transformers(tmp_path, tiny_single_file, caplog, capfd):
    folder = tmp_path / "long"
    write_shape_folder(folder, count=4, size=(64, 64), seed=1, shapes=("circle",), colours=("red",))
    long_caption = ", ".join(f"tag{i}" for i in range(60))  # about 180 tokens
    (sorted(folder.glob("*.txt"))[0]).write_text(long_caption)
    with caplog.at_level("WARNING", logger="pentadactyl"):
        run_job(write_job(tmp_path, tiny_single_file, folder, max_train_steps=2))
    ours = [r.getMessage() for r in caplog.records if "longer than max_token_length" in r.getMessage()]
    assert len(ours) == 1
    assert "1 caption(s) are longer than max_token_length = 75 tokens" in ours[0]
    assert "set max_token_length = 150 or 225" in ours[0] and ".png" in ours[0]
    captured = capfd.readouterr()
    assert "Token indices sequence length" not in captured.err + captured.out
    assert not any("Token indices" in r.getMessage() for r in caplog.records)



def test_parallel_image_loads_leave_pils_bomb_limit_as_it_was(tmp_path):
    """Loader threads switch PIL's global limit off around each open: they must never leave it off."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from library.dataset.images import load_rgb

    write_shape_folder(tmp_path, count=4, size=(64, 64), seed=2, shapes=("circle",), colours=("red",))
    paths = sorted(tmp_path.glob("*.png")) * 100
    before = Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(8) as pool:
        sizes = {img.size for img in pool.map(load_rgb, paths)}
    assert sizes == {(64, 64)} and Image.MAX_IMAGE_PIXELS == before
