"""OpenVINO, the runtime measured beside ONNX Runtime and not adopted: it reads the same ``model.onnx`` (fp32 or the
INT8 QDQ file ``make quantize`` writes) and is called like ``handlers.runtime.OnnxModel``, numpy in and out, so
``make bench-runtimes`` and ``make bench-quantize`` time it through the handler's own forward on the same batches.

It is not in ``handlers/runtime.py``: a serving runtime is adopted only when it wins by more than the run-to-run
spread for the users it serves, and on these machines it did not: fp32 0.85-1.10 of ONNX Runtime, except minilm on
texts near its 256 tokens (1.6 x, for 150 MB more per worker); static INT8 0.98-1.11, dynamic INT8 0.47-0.54
(``docs/reference/figures.md``, "Runtimes not adopted"). Its settings match the served ones: ``threads`` inference
threads, one stream, the latency hint, fp32 arithmetic (its CPU plugin would otherwise pick bf16 where the processor
has it, which changes the answers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU: ``model(*arrays)`` → an array, or a tuple of them."""

    def __init__(self, path: str | Path, threads: int = 1):
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})
        self.request = compiled.create_infer_request()
        self.inputs = len(compiled.inputs)

    def __call__(self, *arrays):
        if len(arrays) != self.inputs:
            raise TypeError(f"the model takes {self.inputs} inputs, not {len(arrays)}")
        result = self.request.infer([np.ascontiguousarray(a) for a in arrays])
        outputs = [np.array(result[port]) for port in self.request.model_outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def eval(self) -> "OpenVinoModel":
        return self


def parity(handler, reference, candidate, inputs) -> float:
    """The largest difference between the two models' outputs on ``inputs`` (a collated batch), relative to the
    reference's largest magnitude: what decides whether the candidate serves the same answers."""
    expected = np.asarray(_first(handler.forward(reference, inputs)), dtype=np.float64)
    got = np.asarray(_first(handler.forward(candidate, inputs)), dtype=np.float64)
    return float(np.abs(expected - got).max() / max(np.abs(expected).max(), 1e-12))


def _first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs
