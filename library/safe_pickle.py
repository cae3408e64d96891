"""Read PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) without ever running code from them.

    state = load_pickle(path, ModelLoadError, "checkpoint")

A pickle names the classes and functions that rebuild its objects, and loading it calls them: a
downloaded pickle can run anything. The first try is `torch.load(weights_only=True)`, torch's own
unpickler, which builds only tensors and plain containers. It refuses every other class, including
the training bookkeeping of PyTorch-Lightning checkpoints: the released SD1.4/SD1.5 `.ckpt` files
carry their `ModelCheckpoint` callback state next to the weights. So when torch refuses, a second
try runs torch's loader with a restricted unpickler: tensor rebuilding as before, the few classes
such checkpoints are known to carry (`HARMLESS_STAND_INS`) become inert objects that ignore their
state, and anything else stops the load before it is called, with an error naming it.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import os
import pickle
import re
import struct
import types
import warnings
import zipfile
from pathlib import Path

import torch

from library.errors import PentadactylError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Classes that released SD1.x checkpoints carry outside their weights: the Lightning callback that
# saved them and the numpy scalars of its scores (numpy 1 and numpy 2 module names). Their state is
# never needed, so they load as stand-ins that keep nothing and call nothing.
HARMLESS_STAND_INS = frozenset({
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
})

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ZIP_SIGNATURE = b"PK\x03\x04"


class InertStandIn:
    """What a known-harmless class of a checkpoint becomes: it accepts any arguments and state, keeps none."""

    original: str = ""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<ignored {self.original}>"


_STAND_INS = {name: type(name.rsplit(".", 1)[1], (InertStandIn,), {"original": name})
              for name in HARMLESS_STAND_INS}

# What torch's weights-only unpickler also rebuilds: tensors, parameters and the containers of a state dict.
# (Storage classes never get here: torch's own unpickler wrapper resolves every "...Storage" name first.)
_TENSOR_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": getattr(torch._utils, "_rebuild_tensor_v3", None),
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
    "torch.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "_codecs.encode": _codecs.encode,  # protocol-2 pickles spell bytes with it
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
}


class BlockedGlobal(pickle.UnpicklingError):
    """The restricted unpickler met a class or function it does not allow; nothing was called."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # protocol-2 pickles (torch.save's default) spell Python 3 names the Python 2 way: __builtin__.set
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _STAND_INS:
            return _STAND_INS[full]
        found = _TENSOR_GLOBALS.get(full)
        if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise BlockedGlobal(full)
        return found


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a pickle *module*: it subclasses its Unpickler and calls its load.
_restricted_pickle = types.ModuleType("pentadactyl_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load


def load_pickle(path: str | os.PathLike, error_cls: type[PentadactylError], what: str = "checkpoint",
                fix: str | None = None, damaged: str | None = None) -> object:
    """The object in a torch.save / Lightning pickle, built without running code from the file.

    Every problem raises `error_cls` with a message that names the file: missing, empty, truncated,
    corrupt, or refused (naming the class or function that would have been called). `what` names the
    file's role in those messages ("checkpoint", "embedding", "optimizer state"); `fix` replaces the
    advice of a refusal (by default: get or make a .safetensors file); `damaged` replaces the cause and
    advice given for an empty, truncated or corrupt file (by default: an interrupted download, get it again).
    """
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"{path}: no such file; check the path of the {what}.")
    size = path.stat().st_size
    if size == 0:
        raise error_cls(f"{path}: the {what} is empty (0 bytes); " + (damaged or "an interrupted download or copy "
                        "leaves it so: download or copy it again."))
    with open(path, "rb") as handle:
        head = handle.read(4)
    is_zip = zipfile.is_zipfile(path)
    if head == _ZIP_SIGNATURE and not is_zip:  # torch.save's zip format, without its end (the zip directory)
        raise error_cls(_truncated(path, what, size, damaged))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes: our own messages say what matters
            try:
                # mmap avoids a second copy of the weights, but only the zip format supports it
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
            except pickle.UnpicklingError:
                return torch.load(str(path), map_location="cpu", weights_only=False, mmap=is_zip,
                                  pickle_module=_restricted_pickle)
    except BlockedGlobal as exc:
        advice = fix or f"Get the .safetensors release of this {what}, or convert it to .safetensors with a tool you trust."
        raise error_cls(
            f"{path}: refused to load this {what}: its pickle calls {exc.name}, which is neither a tensor nor a "
            f"known-harmless checkpoint class, and a pickle's calls can run any code. Nothing was executed: "
            f"pentadactyl never executes code from the files it loads. {advice}") from None
    except (EOFError, struct.error):
        raise error_cls(_truncated(path, what, size, damaged)) from None
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError) as exc:
        if "truncated" in str(exc) or "unexpected EOF" in str(exc):
            raise error_cls(_truncated(path, what, size, damaged)) from None
        raise error_cls(f"{path}: cannot read this {what} ({_plain(exc)}); " + (damaged or "the file is corrupt or "
                        "not a PyTorch checkpoint. Download or copy it again, preferably as .safetensors.")) from None


def _truncated(path: Path, what: str, size: int, damaged: str | None = None) -> str:
    return (f"{path}: the {what} is truncated (its end is missing after {size:,} bytes); " + (damaged or
            "probably an interrupted download or copy: download or copy it again, preferably as .safetensors."))


def _plain(exc: BaseException) -> str:
    """One short line of an exception, without terminal colour codes or torch's loading advice."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not text or "weights_only" in text or "Weights only" in text:
        return type(exc).__name__
    if len(text) < 12:  # KeyError(101) and the like say nothing without their kind
        text = f"{type(exc).__name__} {text}"
    return text if len(text) <= 160 else text[:157] + "..."
