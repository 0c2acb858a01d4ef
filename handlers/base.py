"""Shared base for every handler of this project.

Contract
--------
TorchServe calls ``handle(data, context)`` with a batch: a list with one dict per request. The payload is under
``data`` or ``body`` (raw bytes from ``curl -T`` / ``--data-binary``), or under the field name of a multipart upload
(``curl -F file=@x``). Every request gets exactly one answer, in order.

Every answer carries ``X-Model-Version``: the version that computed it, also when the request asked for the default
(``/predictions/<model>``) or came through the A/B proxy.

A request whose input is bad gets HTTP 4xx and the JSON body ``{"code": 400, "error": "<reason>", "message": "..."}``;
only that request fails, its neighbours in the batch are answered as usual, and the worker stays up.

Every batch is measured (``handlers/metrics.py``): the time of each step, its size, the top-1 class of each answer
(``top_class``) and the reason of each refusal, labelled with the model's name and version.

Layers
------
* this base: device and TorchScript loading (``BaseHandler``), settings from model-config.yaml's ``handler:`` section,
  torch threads, warm-up, payload extraction, per-request errors and batching;
* a task layer (``handlers/vision.py``): ``decode(payload) -> tensor`` for one request, ``collate(tensors) -> batch``;
* a model layer (``handlers/image_classifier.py``): ``answer(outputs) -> list`` with one answer per request.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers.metrics import HandlerMetrics

logger = logging.getLogger(__name__)

PAYLOAD_KEYS = ("data", "body")
VERSION_HEADER = "X-Model-Version"  # on every answer: the version that computed it, whichever URL was asked


def load_torchscript(path: str, device: torch.device, optimize_for_inference: bool) -> torch.jit.ScriptModule:
    """Load an exported model as the server runs it. ``optimize_for_inference`` (CPU only: it folds and converts
    convolutions for oneDNN) cannot be saved, so it is applied here, at load time, and by the build's parity check."""
    model = torch.jit.load(path, map_location=device).eval()
    if optimize_for_inference and device.type == "cpu":
        model = torch.jit.optimize_for_inference(model)
    return model


class InputError(Exception):
    """A request the handler cannot serve because of its input: answered with ``status`` (4xx) and a reason."""

    def __init__(self, reason: str, message: str, status: int = 400):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"code": self.status, "error": self.reason, "message": self.message}


@dataclass
class Batch:
    """One TorchServe batch on its way through preprocess → inference → postprocess."""

    size: int
    errors: dict[int, InputError] = field(default_factory=dict)
    inputs: Any = None  # the collated inputs of the good requests, in request order; None if there are none
    outputs: Any = None
    seconds: dict[str, float] = field(default_factory=dict)  # time of each step that ran

    @contextmanager
    def timed(self, step: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = time.perf_counter() - started


def payload_of(row: Any) -> bytes:
    """The request body as bytes: raw body, multipart field, or base64 text."""
    value = row
    if isinstance(row, dict):
        value = next((row[key] for key in PAYLOAD_KEYS if row.get(key) is not None), None)
        if value is None:  # a multipart upload under another field name: take its first file
            value = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
        if value is None and row:
            fields = ", ".join(sorted(str(key)[:20] for key in row)[:5])
            raise InputError("no_file", f"the request has form fields ({fields}) but no file: send the raw file "
                                        "(curl -T file) or a multipart upload (curl -F data=@file)")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("not_base64", "the body is text, but not base64: send the raw file or its base64")
    if isinstance(value, dict):
        raise InputError("unexpected_json", "the body is a JSON object; send the raw file (curl -T file) or multipart")
    if not value:
        raise InputError("empty_body", "the request has an empty body; send the input as the body or a multipart file")
    if not isinstance(value, (bytes, bytearray)):
        raise InputError("unreadable_body", f"cannot read a {type(value).__name__} body")
    return bytes(value)


class ModelHandler(BaseHandler):
    """Base of the project's handlers. Subclasses set ``DEFAULTS`` and implement decode, collate and answer."""

    # Settings and their defaults; model-config.yaml's ``handler:`` section overrides them. Unknown keys are refused.
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "threads": 1,  # torch intra-op threads per worker: workers x threads should not exceed the cores
        "warmup_runs": 2,  # TorchScript optimises on its first calls; do them before the worker reports READY
        "optimize_for_inference": True,  # torch.jit.optimize_for_inference at load, on CPU
    }

    def initialize(self, context) -> None:
        self.settings = self.load_settings(getattr(context, "model_yaml_config", None) or {})
        torch.set_num_threads(int(self.settings["threads"]))
        self.configure()
        super().initialize(context)
        self.context = context
        self.version = context.manifest.get("model", {}).get("modelVersion", "")
        self.metrics = HandlerMetrics(context)
        example = self.example_input()
        with torch.inference_mode():
            for _ in range(int(self.settings["warmup_runs"])):
                self.model(example.to(self.device))
        logger.info("%s ready on %s with settings %s", type(self).__name__, self.device, self.settings)

    def _load_torchscript_model(self, model_pt_path: str) -> torch.jit.ScriptModule:
        return load_torchscript(model_pt_path, self.device, bool(self.settings["optimize_for_inference"]))

    @classmethod
    def from_config(cls, model_config: dict) -> "ModelHandler":
        """A handler configured from a model-config, without TorchServe or a model: its decode, collate and answer
        are what the build uses to measure parity and accuracy on exactly what the server computes."""
        handler = cls()
        handler.settings = cls.load_settings(model_config)
        handler.configure()
        return handler

    @classmethod
    def load_settings(cls, model_yaml_config: dict) -> dict[str, Any]:
        given = model_yaml_config.get("handler") or {}
        unknown = sorted(set(given) - set(cls.DEFAULTS))
        if unknown:
            raise ValueError(f"unknown handler settings {unknown} for {cls.__name__}; known: {sorted(cls.DEFAULTS)}")
        return {**cls.DEFAULTS, **given}

    # --- the three steps TorchServe's BaseHandler.handle() calls --------------------------------------------------

    def preprocess(self, data: list) -> Batch:
        batch = Batch(size=len(data))
        with batch.timed("preprocess"):
            items = []
            for idx, row in enumerate(data):
                try:
                    items.append(self.decode(payload_of(row)))
                except InputError as error:
                    logger.info("request %d of %d refused: %s: %s", idx, len(data), error.reason, error.message)
                    batch.errors[idx] = error
            if items:
                batch.inputs = self.collate(items)
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        if batch.inputs is not None:
            with batch.timed("inference"), torch.inference_mode():
                batch.outputs = self.model(batch.inputs.to(self.device), *args, **kwargs)
        return batch

    def postprocess(self, batch: Batch) -> list:
        with batch.timed("postprocess"):
            answers = self.answer(batch.outputs) if batch.inputs is not None else []
            pending = iter(answers)
            responses = []
            for idx in range(batch.size):
                self.context.set_response_header(idx, VERSION_HEADER, self.version)
                error = batch.errors.get(idx)
                if error is None:
                    responses.append(next(pending))
                    continue
                self.context.set_response_status(error.status, error.message, idx)
                self.context.set_response_content_type(idx, "application/json")
                responses.append(error.body())
        classes = [name for name in map(self.top_class, answers) if name is not None]
        self.metrics.record(batch.size, batch.seconds, classes,
                            [(error.reason, error.status) for error in batch.errors.values()])
        return responses

    # --- what the task and model layers provide -------------------------------------------------------------------

    def configure(self) -> None:
        """Build what the layer needs from ``self.settings`` (transforms, tokenizers), before the model loads."""

    def decode(self, payload: bytes) -> torch.Tensor:
        """One request's payload → one input tensor; raises InputError for bad input."""
        raise NotImplementedError

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """The decoded inputs of the good requests → one batch for the model."""
        return torch.stack(items)

    def example_input(self) -> torch.Tensor:
        """A batch of one, in the model's input shape, for warm-up."""
        raise NotImplementedError

    def answer(self, outputs: torch.Tensor) -> list:
        """Model outputs for the good requests → one JSON-serialisable answer each, in order."""
        raise NotImplementedError

    def top_class(self, answer: Any) -> str | None:
        """The class an answer names first, counted per version (class drift); None: the answer names no class."""
        return None
