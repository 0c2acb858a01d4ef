"""A user's checkpoint file → the tensors to load into an architecture, and loading them strictly.

``read_checkpoint`` accepts the shapes people save: a raw ``state_dict``; a dict holding it under ``state_dict``,
``model``, ``model_state_dict`` and the like, beside optimizer state and epoch numbers; timm-style EMA copies
(``state_dict_ema``, ``model_ema``, ``ema``, ``ema_state_dict``), preferred to the plain weights as timm does unless
``entry`` names one; Lightning ``.ckpt`` files; ``.safetensors``; Hugging Face style ``.bin`` torch files. A dict
entry is a state dict only when every value in it is a tensor.

Torch files are read with ``weights_only=True``: unpickling anything else runs code from the file, so a file holding
a pickled module (or any other class) is refused, naming what it holds, unless the caller allows pickle on purpose
(``ALLOW_PICKLE=1`` / ``unsafe_pickle: true``); then a pickled whole module comes back as ``module``. The only
classes let through without that are plain data that timm's and many training scripts save beside the weights
(``argparse.Namespace``, numpy scalars and dtypes): unpickling them runs no code from the file.

``load_weights`` strips the key prefix wrappers add (``module.`` from DataParallel, ``model.`` from Lightning,
``_orig_mod.`` from torch.compile), then loads strictly: every missing key, unexpected key and shape mismatch is
reported in one CheckpointError line.

``head_size`` reads the number of classes off the last classifier-like weight in the state dict's order. A
safetensors file keeps no order, so its tensors come back in natural order with head-like modules
(``classifier``, ``fc``, ``head``...) last.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from export.architecture import code_on_path

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
EMA_ENTRIES = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
PLAIN_ENTRIES = ("state_dict", "model_state_dict", "model", "net", "network")
PREFERRED_ENTRIES = EMA_ENTRIES + PLAIN_ENTRIES  # EMA first, as timm's loader does
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format, a pickle stream
# module names classifier heads go by (torchvision, timm, Hugging Face, efficientnet-pytorch's _fc), to find the
# head in a safetensors file, which keeps no order
HEAD_NAMES = ("classifier", "fc", "head", "heads", "logits", "last_linear", "out", "output")
SHOWN = 3  # key names given per kind of problem in one error line
GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+) was not an allowed global")
ALLOW_PICKLE_HOW = ("save model.state_dict() instead, or allow it on purpose with ALLOW_PICKLE=1 (make variable) "
                    "or unsafe_pickle: true in the spec's source")


class CheckpointError(ValueError):
    """The checkpoint cannot be read or does not fit the architecture; the message says what to do."""


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor] | None  # flat state dict (None when `module` is set)
    module: torch.nn.Module | None  # a pickled whole module: only with allow_pickle=True
    entry: str | None  # the top-level key the weights came from; None for a raw state dict / safetensors
    entries: list[str]  # every candidate entry found in the file


# --- reading the file ------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")


def _not_a_checkpoint(path: Path, error: BaseException) -> CheckpointError:
    with path.open("rb") as file:
        head = file.read(len(ZIP_MAGIC))
    if "TorchScript" in str(error):
        return CheckpointError(f"{path} is a TorchScript archive, not a checkpoint; give the weights it was "
                               "exported from, saved with torch.save(model.state_dict(), ...)")
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):
        detail = "its zip archive is truncated or damaged"
    elif head == ZIP_MAGIC or head.startswith(PICKLE_MAGIC):
        detail = _first_line(error).split(". ")[0]  # torch's messages run on for several sentences
    else:
        detail = "it is neither the zip archive torch.save writes nor a pickle"
    return CheckpointError(f"{path} is not a checkpoint torch can read ({detail}); give the file that "
                           "torch.save or safetensors wrote, whole")


def _data_globals() -> list:
    """Classes that carry data only (no code runs when they are unpickled), let through with weights_only=True."""
    import argparse

    import numpy
    import numpy.dtypes

    core = getattr(numpy, "_core", None) or numpy.core
    dtypes = [getattr(numpy.dtypes, name) for name in dir(numpy.dtypes) if name.endswith("DType")]
    scalar = core.multiarray.scalar
    return [argparse.Namespace, numpy.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"), *dtypes]


def _pickled_globals(path: Path, error: BaseException | None = None) -> list[str]:
    """What the file pickles beyond tensors: the name torch's refusal gives first, then the others it lists."""
    named = GLOBAL_IN_MESSAGE.findall(str(error)) if error is not None else []
    try:
        listed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as failure:  # legacy (non-zip) files cannot be listed without unpickling them
        logger.debug("cannot list the globals in %s: %s", path, _first_line(failure))
        listed = []
    allowed = {_global_name(item) for item in _data_globals()}
    listed = [name for name in listed if name not in allowed]
    users = [name for name in named + listed if not name.startswith("torch.")]  # the user's classes say the most
    return list(dict.fromkeys(users or named + listed))


def _global_name(item) -> str:
    return item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"


def _natural_key(name: str) -> tuple:
    """Sort key: numbered parts by number (``features.10`` after ``features.9``), head-like modules last."""
    parts = name.split(".")
    head = any(part.strip("_").lower() in HEAD_NAMES for part in parts[:-1])
    return head, [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts]


def _load_safetensors(path: Path) -> dict:
    """The tensors in a safetensors file. The format keeps no order (tensors are laid out by dtype and name), so
    they come back in natural order with head-like modules last, for ``head_size``."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types for a bad header or a truncated file
        raise CheckpointError(f"{path} is not a safetensors file ({_first_line(error)}); give the file "
                              "safetensors.torch.save_file wrote, whole") from None
    return {name: tensors[name] for name in sorted(tensors, key=_natural_key)}


def _load_weights_only(path: Path):
    try:
        with torch.serialization.safe_globals(_data_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")  # refused below, with a reason
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _pickled_globals(path, error)
        if not names:
            raise _not_a_checkpoint(path, error) from None
        shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
        raise CheckpointError(f"{path} holds a pickled {shown}, not only tensors; unpickling it would run code "
                              f"from the file, so it is refused: {ALLOW_PICKLE_HOW}") from None
    except Exception as error:  # torch raises KeyError, RuntimeError, EOFError... for files that are no checkpoint
        raise _not_a_checkpoint(path, error) from None


def _load_pickle(path: Path, code: Path | None):
    modules = [name.rpartition(".")[0] for name in _pickled_globals(path)]
    logger.warning("unpickling %s with weights_only=False: allowed on purpose (unsafe_pickle)", path)
    with code_on_path(code, modules):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as error:
            raise CheckpointError(f"{path} pickles code that cannot be imported ({_first_line(error)}); put the "
                                  "module that defines it in the code folder, or save model.state_dict() "
                                  "instead") from None
        except Exception as error:  # as above: any failure here means the file is not a checkpoint
            raise _not_a_checkpoint(path, error) from None


def _is_state(value) -> bool:
    return (isinstance(value, dict) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _choose(path: Path, raw: dict, entries: list[str], entry: str | None) -> str:
    if entry is not None:
        if entry in entries:
            return entry
        raise CheckpointError(f"{path} has no entry {entry!r} holding weights; it has: "
                              f"{', '.join(entries) or 'none'}; set entry: to one of them")
    if not entries:
        keys = [str(key) for key in raw][:8]
        raise CheckpointError(f"{path} holds no state dict (a dict of tensors); its keys are {', '.join(keys)}; "
                              "save model.state_dict()")
    preferred = [name for name in PREFERRED_ENTRIES if name in entries]
    if preferred:
        return preferred[0]
    if len(entries) == 1:
        return entries[0]
    raise CheckpointError(f"{path} holds several state dicts ({', '.join(entries)}); choose one with entry: in "
                          "the spec's source")


def _checkpoint(path: Path, raw, allow_pickle: bool, entry: str | None) -> Checkpoint:
    if isinstance(raw, torch.nn.Module) or _is_state(raw):
        if entry is not None:
            held = "a whole module" if isinstance(raw, torch.nn.Module) else "a bare state dict"
            raise CheckpointError(f"{path} holds {held}, with no entries; remove entry: {entry}")
        if isinstance(raw, torch.nn.Module):
            return Checkpoint(state=None, module=raw, entry=None, entries=[])
        return Checkpoint(state=dict(raw), module=None, entry=None, entries=[])
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict; save model.state_dict()")
    entries = [key for key, value in raw.items() if isinstance(key, str)
               and (_is_state(value) or (allow_pickle and isinstance(value, torch.nn.Module)))]
    chosen = _choose(path, raw, entries, entry)
    value = raw[chosen]
    if isinstance(value, torch.nn.Module):
        return Checkpoint(state=None, module=value, entry=chosen, entries=entries)
    return Checkpoint(state=dict(value), module=None, entry=chosen, entries=entries)


def read_checkpoint(path: Path, allow_pickle: bool = False, entry: str | None = None,
                    code: Path | None = None) -> Checkpoint:
    """The weights in ``path``. ``entry`` picks a top-level key (else the EMA copy, else the plain weights);
    ``allow_pickle`` lets a pickled module through, its classes imported from ``code`` (or installed packages)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of the file with the weights")
    if path.suffix == ".safetensors":
        raw = _load_safetensors(path)
    else:
        raw = _load_pickle(path, code) if allow_pickle else _load_weights_only(path)
    checkpoint = _checkpoint(path, raw, allow_pickle, entry)
    logger.info("read %s: %s from entry %s (entries: %s)", path,
                "a whole module" if checkpoint.module is not None else f"{len(checkpoint.state)} tensors",
                checkpoint.entry, checkpoint.entries)
    return checkpoint


# --- what the weights say --------------------------------------------------------------------------------------


def head_size(state: dict[str, torch.Tensor]) -> int:
    """The number of outputs of the classifier head: dim 0 of the last ``*weight`` tensor with 2 or more dims (a
    Linear head, or a 1x1 convolution head as in squeezenet)."""
    for name, tensor in reversed(list(state.items())):
        if name.endswith("weight") and tensor.ndim >= 2:
            return int(tensor.shape[0])
    raise CheckpointError("the checkpoint has no classifier weight (a tensor named *weight with 2 or more dims); "
                          "give the number of classes in the spec")


# --- loading into a model --------------------------------------------------------------------------------------


def _prefixes(keys: list[str]) -> set[str]:
    candidates = {""}
    for key in keys:
        parts = key.split(".")
        candidates.update(".".join(parts[:n]) + "." for n in (1, 2) if len(parts) > n)
    return candidates


def _best_prefix(keys: list[str], expected: set[str]) -> str:
    """The prefix whose stripping makes the most keys match the model's (ties: the shortest)."""
    def matches(prefix: str) -> int:
        return sum(1 for key in keys if key.startswith(prefix) and key[len(prefix):] in expected)

    return max(sorted(_prefixes(keys)), key=lambda prefix: (matches(prefix), -len(prefix)))


def _few(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _misfit(kept: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """What keeps the tensors from loading strictly: one phrase per kind of problem."""
    # torch fills in BatchNorm's num_batches_tracked when an old checkpoint lacks it; it changes no output
    missing = [k for k in expected if k not in kept and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in expected]
    shapes = [f"{k}: checkpoint {list(kept[k].shape)}, model {list(expected[k].shape)}"
              for k in kept if k in expected and kept[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_count(len(missing), 'key')} ({_few(missing)})")
    if unexpected:
        problems.append(f"unexpected {_count(len(unexpected), 'key')} ({_few(unexpected)})")
    if shapes:
        problems.append(f"shape mismatch in {len(shapes)} ({_few(shapes)})")
    return problems


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> dict:
    """Load ``state`` into ``model`` (called ``name`` in messages) strictly, after stripping the best key prefix.
    Returns ``{"prefix": ..., "ignored": [keys outside the prefix], "tensors": n loaded}``."""
    expected = model.state_dict()
    prefix = _best_prefix(list(state), set(expected))
    kept = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
    ignored = [key for key in state if not key.startswith(prefix)]
    problems = _misfit(kept, expected)
    if problems:
        under = f" (keys read under the prefix {prefix})" if prefix else ""
        raise CheckpointError(f"the checkpoint does not fit {name}: {'; '.join(problems)}{under}; check that the "
                              "architecture and its args are the ones it was trained with")
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as error:  # a custom module's own loading hook can still refuse
        raise CheckpointError(f"the checkpoint does not fit {name}: {_first_line(error)}") from None
    if ignored:
        logger.info("loading %s: ignored %d keys outside the prefix %r: %s", name, len(ignored), prefix, _few(ignored))
    return {"prefix": prefix, "ignored": ignored, "tensors": len(kept)}
