"""Eager model → TorchScript file, and the parity check that gates every archive.

``export_torchscript`` traces (or scripts, where the model has data-dependent control flow), optionally freezes, and
saves. ``check_parity`` loads the saved file back as the server does (``handlers.base.load_torchscript``) and
compares it with the eager model on named batches of real inputs (the build passes each input alone and all of them
together, so the batch axis is proven dynamic). Any output more than ``tolerance`` (max abs) away from eager fails the check, naming the input.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

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


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, method: str = "trace",
                       freeze: bool = True) -> Path:
    model = model.eval()
    with torch.no_grad():
        if method == "trace":
            scripted = torch.jit.trace(model, example, check_trace=False)
        elif method == "script":
            scripted = torch.jit.script(model)
        else:
            raise ValueError(f"export method must be trace or script, not {method!r}")
        if freeze:
            scripted = torch.jit.freeze(scripted)
    torch.jit.save(scripted, str(path))
    return path


def check_parity(eager: torch.nn.Module, exported_path: Path, cases: dict[str, torch.Tensor],
                 optimize_for_inference: bool, tolerance: float = PARITY_TOLERANCE) -> ParityResult:
    """Compare the saved export, loaded as the server loads it, with eager on each named batch of inputs."""
    exported = load_torchscript(str(exported_path), torch.device("cpu"), optimize_for_inference)
    worst_name, worst = "", -1.0
    with torch.inference_mode():
        for name, batch in cases.items():
            expected, actual = eager(batch), exported(batch)
            if expected.shape != actual.shape:
                raise ParityError(f"parity check failed on {name}: exported output shape {tuple(actual.shape)} "
                                  f"!= eager {tuple(expected.shape)}")
            diff = float((expected.float() - actual.float()).abs().max())
            if diff != diff or diff > tolerance:  # NaN counts as a failure
                raise ParityError(f"parity check failed on {name}: max |exported - eager| = {diff:.3g} "
                                  f"> tolerance {tolerance:g}")
            if diff > worst:
                worst_name, worst = name, diff
    return ParityResult(max_abs_diff=worst, worst_input=worst_name, inputs=len(cases), tolerance=tolerance)
