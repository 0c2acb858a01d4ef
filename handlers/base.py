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

An answer is JSON unless the layer returns a ``Reply``: bytes with their own ``Content-Type`` (a PNG), and
response headers of the request's own (``X-Input-Truncated``).

Explanations: ``POST /explanations/<model>`` reaches the same handler with the request header ``explain: True``.
It is read per request (TorchServe's own handler looks at the first request of a batch only), so a batch may mix
predictions and explanations; each explained request gets ``explanation(item)`` from its layer, computed with
Integrated Gradients (Captum) on the TorchScript weights loaded without ``optimize_for_inference``, whose fused
CPU kernels have no gradients. A model whose layer does not explain answers 400 ``no_explanations``.

Layers
------
* this base: device and model loading on its runtime (``handlers/runtime.py``: TorchScript or ONNX Runtime), settings from model-config.yaml's ``handler:`` section,
  torch threads, warm-up, payload extraction, per-request errors, batching, replies and explanations;
* a task layer (``handlers/vision.py``, ``handlers/text.py``, ...): ``decode(payload) -> item`` for one request (any
  object), ``collate(items) -> inputs`` (whatever ``forward`` takes), ``forward(model, inputs) -> outputs``
  (default: ``model(inputs)``, or ``model(*inputs)`` for a tuple), ``example_input()`` and ``DYNAMIC_AXES`` (the
  axes of the model's inputs that vary, for the ONNX export);
* a model layer (``handlers/image_classifier.py``, ...): ``answer(outputs, items) -> list`` with one answer per
  request, and optionally ``explanation(item)`` (not ``explain``: TorchServe's BaseHandler uses that name).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import load_label_mapping

from handlers.metrics import HandlerMetrics
from handlers.runtime import TORCHSCRIPT_FILE, load_model, load_torchscript, runtime_of

logger = logging.getLogger(__name__)

PAYLOAD_KEYS = ("data", "body")
BUILD_RECORD = "model_info.json"  # in the archive: the build record
VERSION_HEADER = "X-Model-Version"  # on every answer: the version that computed it, whichever URL was asked


def as_args(inputs: Any) -> tuple:
    """A model's input as call arguments: a tuple is spread, anything else is the one argument."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def to_device(inputs: Any, device: torch.device) -> Any:
    """Tensors, and tuples and lists of them, moved to the device."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    return inputs


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
class Reply:
    """An answer that is not JSON (``body`` is bytes), or that carries response headers of its own."""

    body: Any
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Batch:
    """One TorchServe batch on its way through preprocess → inference → postprocess."""

    size: int
    errors: dict[int, InputError] = field(default_factory=dict)
    items: dict[int, Any] = field(default_factory=dict)  # request index → decoded input, for the good requests
    explain: set[int] = field(default_factory=set)  # indices of the requests sent to /explanations
    inputs: Any = None  # the collated inputs of the good prediction requests, in request order; None if none
    answers: dict[int, Any] = field(default_factory=dict)  # request index → answer (JSON-able or Reply)
    seconds: dict[str, float] = field(default_factory=dict)  # time of each step that ran

    @contextmanager
    def timed(self, step: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = time.perf_counter() - started

    @property
    def predicted(self) -> list[int]:
        return [idx for idx in self.items if idx not in self.explain]


def request_value(row: Any) -> Any:
    """The request body as TorchServe passes it: bytes, or text / parsed JSON when the client said so."""
    value = row
    if isinstance(row, dict):
        value = next((row[key] for key in PAYLOAD_KEYS if row.get(key) is not None), None)
        if value is None:  # a multipart upload under another field name: take its first file
            value = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
        if value is None and row:
            fields = ", ".join(sorted(str(key)[:20] for key in row)[:5])
            raise InputError("no_file", f"the request has form fields ({fields}) but no file: send the raw file "
                                        "(curl -T file) or a multipart upload (curl -F data=@file)")
    return value


def payload_of(row: Any) -> bytes:
    """The request body as bytes: raw body, multipart field, or base64 text."""
    value = request_value(row)
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
        "explain_steps": 8,  # Integrated Gradients: steps from the baseline to the input ...
        "explain_batch": 8,  # ... computed this many at a time (one batched forward and backward)
    }
    # The axes of each model input that vary from call to call, kept dynamic when the model is exported to ONNX:
    # one tuple per input. Default: one input, batched on its first axis.
    DYNAMIC_AXES: ClassVar[tuple[tuple[int, ...], ...]] = ((0,),)

    def initialize(self, context) -> None:
        """Load the archive's model on its runtime (``handlers/runtime.py``) and warm it up. TorchServe's own
        loader is bypassed: it would give an ONNX Runtime session every core of the machine in every worker."""
        self.context = context
        self.manifest = context.manifest
        self.settings = self.load_settings(getattr(context, "model_yaml_config", None) or {})
        threads = int(self.settings["threads"])
        torch.set_num_threads(threads)
        properties = context.system_properties
        self.files = Path(properties["model_dir"])
        gpu = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu")
        self.configure()
        self.model_pt_path = str(self.files / self.manifest["model"]["serializedFile"])
        self.runtime = runtime_of(self.model_pt_path)
        self.model = load_model(self.model_pt_path, self.device, threads, bool(self.settings["optimize_for_inference"]))
        self.mapping = load_label_mapping(str(self.files / "index_to_name.json"))
        self.version = self.manifest.get("model", {}).get("modelVersion", "")
        self.metrics = HandlerMetrics(context)
        self.metrics.accuracy(self.build_record().get("accuracy"))
        self.explainer_model = None
        example = as_args(to_device(self.example_input(), self.device))
        with torch.inference_mode():
            for _ in range(int(self.settings["warmup_runs"])):
                self.model(*example)
        self.initialized = True
        logger.info("%s ready on %s (%s) with settings %s", type(self).__name__, self.device, self.runtime,
                    self.settings)

    def build_record(self) -> dict[str, Any]:
        """The archive's model_info.json: how the version was built and measured (empty if it has none)."""
        path = self.files / BUILD_RECORD
        return json.loads(path.read_text()) if path.exists() else {}

    @classmethod
    def from_config(cls, model_config: dict, files: Path | None = None) -> "ModelHandler":
        """A handler configured from a model-config, without TorchServe or a model: its decode, collate, forward and
        answer are what the build uses to measure parity and accuracy on exactly what the server computes. ``files``
        is the folder of the archive's extra files (a tokenizer), as the server's model_dir will hold them."""
        handler = cls()
        handler.settings = cls.load_settings(model_config)
        handler.files = files
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
            for idx, row in enumerate(data):
                if self.context.get_request_header(idx, "explain") == "True":
                    batch.explain.add(idx)
                try:
                    batch.items[idx] = self.decode(self.payload(row))
                except InputError as error:
                    logger.info("request %d of %d refused: %s: %s", idx, len(data), error.reason, error.message)
                    batch.errors[idx] = error
            if batch.predicted:
                batch.inputs = self.collate([batch.items[idx] for idx in batch.predicted])
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        with batch.timed("inference"):
            if batch.inputs is not None:
                with torch.inference_mode():
                    outputs = self.forward(self.model, to_device(batch.inputs, self.device))
                predicted = batch.predicted
                batch.answers.update(zip(predicted, self.answer(outputs, [batch.items[idx] for idx in predicted])))
            for idx in sorted(batch.explain & batch.items.keys()):
                try:
                    batch.answers[idx] = self.explanation(batch.items[idx])
                except InputError as error:
                    batch.errors[idx] = error
        return batch

    def postprocess(self, batch: Batch) -> list:
        with batch.timed("postprocess"):
            responses = []
            for idx in range(batch.size):
                self.context.set_response_header(idx, VERSION_HEADER, self.version)
                error = batch.errors.get(idx)
                if error is not None:
                    self.context.set_response_status(error.status, error.message, idx)
                    self.context.set_response_content_type(idx, "application/json")
                    responses.append(error.body())
                    continue
                reply = batch.answers[idx]
                if not isinstance(reply, Reply):
                    reply = Reply(reply)
                self.context.set_response_content_type(idx, reply.content_type)
                for key, value in reply.headers.items():
                    self.context.set_response_header(idx, key, value)
                responses.append(reply.body)
        answered = [batch.answers[idx] for idx in batch.predicted if idx not in batch.errors]
        classes = [name for name in map(self.top_class, answered) if name is not None]
        self.metrics.record(batch.size, batch.seconds, classes,
                            [(error.reason, error.status) for error in batch.errors.values()])
        return responses

    def explain_handle(self, data_preprocess: Batch, raw_data: list) -> list:
        """TorchServe calls this instead of inference + postprocess when the batch's first request is an
        explanation; ``inference`` already tells explanations from predictions request by request."""
        return self.postprocess(self.inference(data_preprocess))

    # --- explanations: Integrated Gradients on the TorchScript weights -------------------------------------------

    def explainer(self) -> torch.jit.ScriptModule:
        """The TorchScript export without optimize_for_inference (its fused kernels have no gradients, and ONNX
        Runtime computes none): loaded on the first explanation, a second copy of the weights in memory from then on.
        Archives of a model that explains ship it beside an ONNX file for this, except where the model came as an
        ONNX file: nothing to take gradients of, 400 ``no_explanations``."""
        if self.explainer_model is None:
            if not (self.files / TORCHSCRIPT_FILE).exists():
                raise InputError("no_explanations", f"{self.manifest['model']['modelName']} "
                                 f"{self.version} was built from an ONNX file: explanations need the model's "
                                 "gradients, which only torch weights give")
            self.explainer_model = load_torchscript(self.files / TORCHSCRIPT_FILE, self.device,
                                                    optimize_for_inference=False)
        return self.explainer_model

    def integrated_gradients(self, function, inputs: torch.Tensor, baselines: torch.Tensor, target=None,
                             additional_forward_args=None) -> tuple[torch.Tensor, float]:
        """Attributions of ``function(inputs)`` (one score per row, or ``target`` picks the column) to ``inputs``,
        integrated along the straight line from ``baselines``; and the convergence delta (how far their sum is
        from ``function(inputs) - function(baselines)``). ``explain_steps`` and ``explain_batch`` bound the cost."""
        from captum.attr import IntegratedGradients

        with torch.enable_grad():
            attributions, delta = IntegratedGradients(function).attribute(
                inputs, baselines=baselines, target=target, additional_forward_args=additional_forward_args,
                n_steps=int(self.settings["explain_steps"]), internal_batch_size=int(self.settings["explain_batch"]),
                return_convergence_delta=True)
        return attributions.detach(), float(delta.abs().max())

    # --- what the task and model layers provide -------------------------------------------------------------------

    def configure(self) -> None:
        """Build what the layer needs from ``self.settings`` (transforms, tokenizers), before the model loads."""

    def payload(self, row: Any) -> Any:
        """One request's body as ``decode`` takes it: bytes by default (see ``payload_of``)."""
        return payload_of(row)

    def decode(self, payload: Any) -> Any:
        """One request's payload → one item (a tensor, or anything collate takes); raises InputError for bad input."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        """The decoded items of the good requests → what ``forward`` takes."""
        return torch.stack(items)

    def forward(self, model, inputs: Any) -> Any:
        """Run the model on collated inputs (the build's parity check runs the eager model through this too)."""
        return model(*as_args(inputs))

    def example_input(self) -> Any:
        """One model call's input, batch of one (a tensor, or a tuple of tensors): for warm-up and tracing."""
        raise NotImplementedError

    def answer(self, outputs: Any, items: list) -> list:
        """Model outputs for the good requests → one answer each, in order: JSON-serialisable, or a ``Reply``."""
        raise NotImplementedError

    def top_class(self, answer: Any) -> str | None:
        """The class a prediction's answer names first, counted per version (class drift); None: it names none."""
        return None

    def explanation(self, item: Any) -> Any:
        """One request's explanation (see ``integrated_gradients``); a layer that can explain overrides this."""
        name = self.context.manifest.get("model", {}).get("modelName", "this model")
        raise InputError("no_explanations", f"{name} does not explain its outputs; ask /predictions/{name}")
