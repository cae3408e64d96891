"""library.safe_pickle: released Lightning .ckpt files load, pickles that call code are refused unexecuted,
empty and truncated files get their own messages; every pickle reader of the project goes through it."""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.embeddings import load_embedding
from library.errors import ConfigError, ModelLoadError, NetworkFileError
from library.models.loading import load_sd1
from library.safe_pickle import load_pickle
from networks import load_network_file
from networks.check_lora import main as check_lora_main

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"
ANSI_ESCAPE = "\x1b["


@contextlib.contextmanager
def fake_lightning():
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint` module, present only while pickling, so the
    file names the class exactly as the released SD1.x checkpoints do."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE]
    for name in names:
        sys.modules[name] = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = None, np.float64(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = LIGHTNING_MODULE, "ModelCheckpoint"
    sys.modules[LIGHTNING_MODULE].ModelCheckpoint = ModelCheckpoint
    try:
        yield ModelCheckpoint
    finally:
        for name in names:
            del sys.modules[name]


def write_released_style_ckpt(path: Path, state: dict[str, torch.Tensor], zip_format: bool = True) -> None:
    """The layout of sd-v1-4.ckpt / v1-5-pruned.ckpt: weights under state_dict, Lightning bookkeeping beside them."""
    with fake_lightning() as ModelCheckpoint:
        torch.save({
            "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "state_dict": state,
            # PL 1.4 keys callback states by the callback's class; the score is a numpy scalar
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.125), "dirpath": "/fsx/checkpoints"}},
            "saved_callback": ModelCheckpoint(),
        }, path, _use_new_zipfile_serialization=zip_format)
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_released_lightning_ckpt_loads_into_the_same_working_model(tiny_single_file, tmp_path, zip_format):
    state = load_file(str(tiny_single_file))
    path = tmp_path / "sd-v1-5.ckpt"
    write_released_style_ckpt(path, state, zip_format)
    with pytest.raises(pickle.UnpicklingError, match=LIGHTNING_MODULE):
        torch.load(path, weights_only=True)  # the file really is what torch alone refuses

    model, reference = load_sd1(path), load_sd1(tiny_single_file)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(model, part).state_dict(), getattr(reference, part).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert torch.equal(model.unet.conv_in.weight, state["model.diffusion_model.input_blocks.0.0.weight"])
    with torch.no_grad():
        context = model.text_encoder(torch.tensor([[49406, 320, 2463, 49407]])).last_hidden_state
        out = model.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=context).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_lightning_bookkeeping_becomes_inert(tmp_path):
    path = tmp_path / "bookkeeping.ckpt"
    write_released_style_ckpt(path, {"w": torch.arange(3.0)})
    obj = load_pickle(path, ModelLoadError)
    assert torch.equal(obj["state_dict"]["w"], torch.arange(3.0)) and obj["global_step"] == 470000
    (callback_class, callback_state), = obj["callbacks"].items()
    assert callback_class.original == f"{LIGHTNING_MODULE}.ModelCheckpoint"
    assert callback_state["dirpath"] == "/fsx/checkpoints"
    assert vars(obj["saved_callback"]) == {}  # its state (monitor, score) was dropped, not rebuilt
    assert "pytorch_lightning" not in sys.modules and "ModelCheckpoint" in repr(obj["saved_callback"])


class _Calls:
    """Pickles as a call of `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _assert_clear_refusal(message: str, path: Path, blocked: str) -> None:
    assert str(path) in message and f"calls {blocked}," in message
    assert "Nothing was executed" in message and ".safetensors" in message
    assert ANSI_ESCAPE not in message and "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "Path.write_text"])
def test_pickle_that_calls_code_is_refused_naming_the_call(tmp_path, writer, how):
    marker = tmp_path / "marker"
    if how == "os.system":
        payload, blocked = _Calls(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    elif how == "builtins.exec":
        payload, blocked = _Calls(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    else:  # a method: torch.save's protocol 2 pickles it as a getattr(class, name) call, refused first
        payload = _Calls(Path.write_text, marker, "code ran")
        blocked = "builtins.getattr" if writer == "torch.save" else "pathlib.Path.write_text"
    path = tmp_path / "evil.ckpt"
    data = {"state_dict": {"model.diffusion_model.x": payload}}
    if writer == "torch.save":
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data))
    with pytest.raises(ModelLoadError) as err:
        load_sd1(path)
    assert not marker.exists()
    _assert_clear_refusal(str(err.value), path, blocked)


def test_every_pickle_reader_refuses_with_its_own_error(tmp_path):
    marker = tmp_path / "marker"
    payload = _Calls(os.system, f"touch {marker}")
    blocked = f"{os.system.__module__}.system"
    for name, read, error in [("embedding.pt", load_embedding, ModelLoadError),
                              ("lora.pt", load_network_file, NetworkFileError),
                              ("optimizer.pt", lambda p: load_pickle(p, ConfigError, "optimizer state"), ConfigError)]:
        path = tmp_path / name
        torch.save({"string_to_param": {"*": payload}}, path)
        with pytest.raises(error) as err:
            read(path)
        _assert_clear_refusal(str(err.value), path, blocked)
    assert not marker.exists()


def test_empty_files_say_empty(tmp_path):
    for name, read, text in [("model.ckpt", load_sd1, "the checkpoint is empty (0 bytes)"),
                             ("model.safetensors", load_sd1, "the checkpoint is empty (0 bytes)"),
                             ("neg.pt", load_embedding, "the embedding is empty (0 bytes)"),
                             ("lora.pt", load_network_file, "the LoRA file is empty (0 bytes)")]:
        path = tmp_path / name
        path.write_bytes(b"")
        with pytest.raises((ModelLoadError, NetworkFileError)) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: {text}") and "download or copy it again" in message
        assert "()" not in message


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.02, 0.999])
def test_truncated_ckpt_says_truncated(tiny_single_file, tmp_path, zip_format, keep):
    whole = tmp_path / "whole.ckpt"
    write_released_style_ckpt(whole, load_file(str(tiny_single_file)), zip_format)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as err:
        load_sd1(cut)
    message = str(err.value)
    assert message.startswith(f"{cut}: the checkpoint is truncated") and "download or copy it again" in message


def test_not_a_pickle_is_named_corrupt(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are my notes, not a model")
    with pytest.raises(ModelLoadError, match=r"notes\.ckpt: cannot read this checkpoint .*corrupt or not a PyTorch"):
        load_sd1(path)


def test_training_state_pickles_round_trip_through_load_pickle(tmp_path):
    """What library.training.state writes: optimizer / scheduler / RNG state, tensors and plain numbers."""
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rng = {"torch": torch.get_rng_state(), "python": [1, 2, 3], "python_version": 3, "python_gauss": None}
    for name, obj in [("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict()),
                      ("rng.pt", rng)]:
        torch.save(obj, tmp_path / name)
        back = load_pickle(tmp_path / name, ConfigError, "training state")
        assert set(back) == set(obj), name
    optimizer.load_state_dict(load_pickle(tmp_path / "optimizer.pt", ConfigError, "training state"))
    assert torch.equal(load_pickle(tmp_path / "rng.pt", ConfigError)["torch"], rng["torch"])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.pt: the training state is empty"):
        load_pickle(tmp_path / "empty.pt", ConfigError, "training state")


def test_pickled_lora_loads_like_its_safetensors(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4),
               f"{name}.alpha": torch.tensor(2.0)}
    torch.save(tensors, tmp_path / "old_kohya.pt")
    loaded, metadata = load_network_file(tmp_path / "old_kohya.pt")
    assert metadata == {} and set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert check_lora_main([str(tmp_path / "old_kohya.pt")]) == 0
    assert "LoRA/LoCon" in capsys.readouterr().out
