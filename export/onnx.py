"""Eager model → ONNX file, for versions served on ONNX Runtime.

The graph comes from ``torch.export`` (the exporter torch develops; the TorchScript-based one is deprecated): it
captures the model as the handler calls it, with the axes the handler's layer names in ``dynamic_axes`` left
dynamic (the batch for images; batch and sequence length for text; height and width for super-resolution). The file
is self-contained (weights inside) and must pass ``onnx.checker`` in full. The build then loads it as the server does
(``handlers.runtime.OnnxModel``) and holds it to the same parity check as TorchScript (``export/parity.py``).

Graph optimisation happens when the server creates its session, not here: measured on efficientnet-lite0, a graph
optimised at build time ran no faster and saved under 50 ms of load time, and a fully optimised graph is tied to the
CPU it was made on.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from handlers.runtime import to_numpy, to_tensors

logger = logging.getLogger(__name__)


class OnnxExportError(RuntimeError):
    """The model cannot be captured as an ONNX graph with the axes asked for."""


class FirstCall:
    """Stands in for a model inside the handler's ``forward`` and keeps the arguments of the first call: what the
    server will feed the exported model, as real inputs."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.args = model, None

    def __call__(self, *arrays):
        args = to_tensors(arrays)
        if self.args is None:
            self.args = args
        with torch.inference_mode():
            return to_numpy(self.model(*args))


def model_call(model: torch.nn.Module, forward: Callable, batch: Any) -> tuple:
    """The arguments ``forward(model, batch)`` calls the model with (the first call, where it makes several), as
    tensors."""
    recorder = FirstCall(model)
    forward(recorder, batch)
    if recorder.args is None:
        raise OnnxExportError("the handler's forward never called the model")
    return recorder.args


def input_names(model: torch.nn.Module, count: int) -> list[str]:
    """The model's forward argument names (``ids``, ``mask``), so the graph's inputs say what they are."""
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:count] if len(names) >= count else [f"input{i}" for i in range(count)]


def export_onnx(model: torch.nn.Module, args: tuple, path: Path, dynamic_axes: tuple[tuple[int, ...], ...]) -> Path:
    """Export ``model`` called with ``args`` (real inputs) to ``path``; ``dynamic_axes`` has one tuple of axes per
    argument. Refused with OnnxExportError, naming the reason, if the graph cannot be captured or is not valid."""
    import onnx

    if len(dynamic_axes) != len(args):
        raise OnnxExportError(f"dynamic_axes names axes for {len(dynamic_axes)} inputs; the model takes {len(args)}")
    dynamic = torch.export.Dim.DYNAMIC
    shapes = tuple({axis: dynamic for axis in axes} for axes in dynamic_axes)
    names = input_names(model, len(args))
    with torch.no_grad():
        outputs = model(*args)
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model.eval(), args, str(path), input_names=names,
                              output_names=["output"] if count == 1 else [f"output{i}" for i in range(count)],
                              dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False)
        except Exception as error:
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise OnnxExportError(f"torch.export could not capture the model for ONNX: {reason[:400]}") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise OnnxExportError(f"the exported ONNX graph is not valid: {str(error).strip()[:400]}") from None
    return path


class OnnxReference:
    """A user's ONNX file run by ``onnx.reference`` (the ONNX specification's own Python implementation of each
    operator), called like the served runtimes (numpy arrays in and out): the "eager" side of the parity check for an ONNX file served as it is, so
    that ONNX Runtime, with its graph optimisations, is held to what the file itself says. Slow (numpy), used only
    at build time."""

    def __init__(self, path: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self.evaluator = ReferenceEvaluator(onnx.load(str(path)))
        except Exception as error:  # onnx's own parse or load errors, named for the user
            raise OnnxExportError(f"{Path(path).name} is not an ONNX model we can read: "
                                  f"{' '.join(str(error).split())[:300]}") from None
        self.input_names = list(self.evaluator.input_names)

    def __call__(self, *arrays):
        feeds = dict(zip(self.input_names, arrays))
        outputs = self.evaluator.run(None, feeds)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def eval(self) -> "OnnxReference":
        return self
