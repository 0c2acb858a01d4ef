"""Eager model → TorchScript file, and the parity check that gates every archive.

``export_torchscript`` traces (or scripts, where the model has data-dependent control flow), optionally freezes
(keeping the methods named in ``preserve`` besides ``forward``), and saves. ``check_parity`` loads the saved file back
as the server does (``handlers.base.load_torchscript``) and compares it with the eager model on named batches of real
inputs (the build passes each input alone and all of them together, so the batch axis is proven dynamic). A batch is
whatever the handler's ``collate`` makes and is run through the handler's ``forward`` (a tensor, a tuple such as
token ids and mask, a list of differently sized images); every tensor in the outputs is compared. Any output more
than ``tolerance`` (max abs) away from eager fails the check, naming the input.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from handlers.base import load_torchscript

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The exported model's outputs differ from the eager model's by more than the tolerance."""


@dataclass
class ParityResult:
    max_abs_diff: float
    worst_input: str
    inputs: int
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def tensors_of(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in a model's outputs: a tensor, or tuples, lists and dicts of them."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in tensors_of(item)]
    return []


def export_torchscript(model: torch.nn.Module, example: Any, path: Path, method: str = "trace",
                       freeze: bool = True, preserve: tuple[str, ...] | list[str] = ()) -> Path:
    model = model.eval()
    with torch.no_grad():
        if method == "trace":
            scripted = torch.jit.trace(model, example, check_trace=False)
        elif method == "script":
            scripted = torch.jit.script(model)
        else:
            raise ValueError(f"export method must be trace or script, not {method!r}")
        if freeze:
            scripted = torch.jit.freeze(scripted, preserved_attrs=list(preserve))
    torch.jit.save(scripted, str(path))
    return path


def check_parity(eager: torch.nn.Module, exported_path: Path, cases: dict[str, Any], optimize_for_inference: bool,
                 tolerance: float = PARITY_TOLERANCE, forward: Callable | None = None) -> ParityResult:
    """Compare the saved export, loaded as the server loads it, with eager on each named batch of inputs, both run
    through ``forward(model, batch)`` (default: ``model(batch)``)."""
    forward = forward or (lambda model, batch: model(batch))
    exported = load_torchscript(str(exported_path), torch.device("cpu"), optimize_for_inference)
    worst_name, worst = "", -1.0
    with torch.inference_mode():
        for name, batch in cases.items():
            expected, actual = tensors_of(forward(eager, batch)), tensors_of(forward(exported, batch))
            shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in actual]
            if shapes[0] != shapes[1]:
                raise ParityError(f"parity check failed on {name}: exported output shapes {shapes[1]} "
                                  f"!= eager {shapes[0]}")
            diff = max(float((e.float() - a.float()).abs().max()) for e, a in zip(expected, actual))
            if diff != diff or diff > tolerance:  # NaN counts as a failure
                raise ParityError(f"parity check failed on {name}: max |exported - eager| = {diff:.3g} "
                                  f"> tolerance {tolerance:g}")
            if diff > worst:
                worst_name, worst = name, diff
    return ParityResult(max_abs_diff=worst, worst_input=worst_name, inputs=len(cases), tolerance=tolerance)
