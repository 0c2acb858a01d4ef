"""Export stage: weights → eager model → TorchScript or ONNX, gated by a parity check against the eager model."""

import logging
import sys


def configure_logging() -> None:
    """Progress on stderr, one line a step; the libraries' own chatter (each ONNX graph rewrite) left out. Call it
    before importing the build: TorchServe's handler module logs its notes on accelerators it lacks at import."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for chatty in ("model_archiver", "onnxscript", "onnx_ir"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("ts").setLevel(logging.ERROR)
