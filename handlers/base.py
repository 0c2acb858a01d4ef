"""Shared base for every handler of this project.

Contract
--------
TorchServe calls ``handle(data, context)`` with a batch: a list with one dict per request. The payload is under
``data`` or ``body`` (raw bytes from ``curl -T`` / ``--data-binary``), or under the field name of a multipart upload
(``curl -F file=@x``). Every request gets exactly one answer, in order.

Every answer carries ``X-Model-Version``: the version that computed it, also when the request asked for the default
(``/predictions/<model>``) or came through the A/B proxy.

A request whose input is bad gets HTTP 4xx and the JSON body ``{"code": 400, "error": "<reason>", "message": "..."}``;
only that request fails, its neighbours in the batch are answered as usual, and the worker stays up. The layers bound
the work one request can cause before doing it (pixels, texts, characters, JSON depth: see each layer's docstring),
so no input makes the worker run out of memory or time. A request whose decoding fails in a way no layer foresaw is
answered 500 ``internal_error`` on its own (logged with its traceback); its neighbours are answered as usual.
The HTTP reason phrase is the message reduced to printable ASCII, at most ``PHRASE_CHARS`` characters (TorchServe's
frontend fails on a phrase with a line break).

Bounds of this base (settings below), refused with a 4xx before the answer reaches TorchServe:

* ``max_answer_bytes``: an answer is measured as TorchServe sends it (the handler hands the worker bytes: a
  ``Reply``'s own, or JSON written with ``indent=2`` as TorchServe would write it); one over the bound is answered 413 ``answer_too_large`` instead (TorchServe's
  ``max_response_size``, 26214400 bytes in config.properties, would kill the worker). The layers bound their inputs
  so that no answer comes near it with their default settings;
* a batch's work: a layer whose inputs vary in size bounds a batch's total (``budget()``, counted by ``cost(item)``;
  text: word pieces), so that a full batch of the largest requests still ends well within ``responseTimeout``, over
  which TorchServe kills the worker; a request past it is answered 503 ``busy`` and the front door sends it once more;
* multipart bodies from the front door: nginx forwards a body whose Content-Type is ``multipart/form-data`` or
  ``application/x-www-form-urlencoded`` as ``application/octet-stream``, with the client's Content-Type in the request
  header ``X-Original-Content-Type`` (TorchServe's frontend answers 500 to a malformed multipart body). When that
  header says ``multipart/form-data``, the handler parses the body itself (python-multipart) and takes the part named
  ``data``, else ``body``, else the first file part (one with a filename), as for a form TorchServe parsed. A body
  that is not multipart as its header says (no boundary, cut short, no parts, a part without a name, more than
  ``max_form_parts`` parts) is 400 ``bad_multipart``; a form with fields but no file is 400 ``no_file``. A
  form-urlencoded body is read as the raw body, as without the front door. Requests without the header are read as
  TorchServe passes them.

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
* this base: device and model loading on its runtime (``handlers/runtime.py``: TorchScript or ONNX Runtime, numpy
  arrays in and out), settings from model-config.yaml's ``handler:`` section, threads, warm-up, payload extraction,
  per-request errors, batching, replies and explanations;
* a task layer (``handlers/vision.py``, ``handlers/text.py``, ...): ``decode(payload) -> item`` for one request (any
  object), ``collate(items) -> inputs`` (numpy arrays, as ``forward`` takes them), ``forward(model, inputs) -> outputs``
  (default: ``model(inputs)``, or ``model(*inputs)`` for a tuple), ``example_input()`` and ``DYNAMIC_AXES`` (the
  axes of the model's inputs that vary, for the ONNX export);
* a model layer (``handlers/image_classifier.py``, ...): ``answer(outputs, items) -> list`` with one answer per
  request, and optionally ``explanation(item)`` (not ``explain``: TorchServe's BaseHandler uses that name).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs

import numpy as np
from ts.utils.util import load_label_mapping

from handlers.inputs import (
    FORM_HEADER,
    InputError,
    form_payload,
    payload_of,
    request_header,
)
from handlers.metrics import HandlerMetrics
from handlers.runtime import (
    TORCHSCRIPT_FILE,
    as_args,
    load_model,
    load_torchscript,
    runtime_of,
    torch_device,
    torch_installed,
)

logger = logging.getLogger(__name__)

BUILD_RECORD = "model_info.json"  # in the archive: the build record
VERSION_HEADER = "X-Model-Version"  # on every answer: the version that computed it, whichever URL was asked
QUERY_HEADER = "X-Query"  # set by the front door: the URL's query string (per-request options)
MAX_QUERY_CHARS = 2048


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


def parse_option(name: str, text: str, rule: tuple) -> Any:
    """A per-request option's text checked against its rule: (int or float, lowest, highest), or the words allowed."""
    if rule and isinstance(rule[0], type):
        kind, low, high = rule
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or not low <= value <= high:
            raise InputError("bad_option", f"{name}={text[:40]!r}: {name} is {'an integer' if kind is int else 'a number'}"
                                           f" from {low} to {high}")
        return value
    if text not in rule:
        raise InputError("bad_option", f"{name}={text[:40]!r}: {name} is one of {', '.join(rule)}")
    return text


def encode_answer(body: Any) -> bytes:
    """An answer as TorchServe sends it: bytes as they are, text in UTF-8, anything else as JSON written with
    indent=2 (what TorchServe's worker writes for an answer that is neither). Handing the worker bytes keeps it off
    its tensor branch, which would import torch."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return json.dumps(body, indent=2).encode("utf-8")


class ModelHandler:
    """Base of the project's handlers. Subclasses set ``DEFAULTS`` and implement decode, collate and answer.

    TorchServe's handler contract: the entry module defines one class; the worker creates it, calls
    ``initialize(context)`` once and ``handle(data, context)`` per batch. ``handle`` runs ``preprocess``,
    ``inference`` and ``postprocess``, as TorchServe's ``BaseHandler`` does, and records ``HandlerTime``. It is not a
    subclass of ``BaseHandler``: that module imports torch (and its profiler) when it is imported, 320 MB in every
    worker, ONNX Runtime workers included; TorchScript workers import torch when their model loads.
    """

    initialized = False

    # Settings and their defaults; model-config.yaml's ``handler:`` section overrides them. Unknown keys are refused.
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "threads": 1,  # torch intra-op threads per worker: workers x threads should not exceed the cores
        "warmup_runs": 2,  # TorchScript optimises on its first calls; do them before the worker reports READY
        "optimize_for_inference": True,  # torch.jit.optimize_for_inference at load, on CPU
        "explain_steps": 8,  # Integrated Gradients: steps from the baseline to the input ...
        "explain_batch": 8,  # ... computed this many at a time (one batched forward and backward)
        # the largest answer sent (bytes as TorchServe sends it), safely under TorchServe's max_response_size
        # (26214400 in config.properties; an answer over it kills the worker): 413 answer_too_large above
        "max_answer_bytes": 20 * 1024 * 1024,
        "max_form_parts": 16,  # parts of a multipart body the front door relabelled (400 bad_multipart above)
    }
    # What a client may set per request, as ``?name=value`` on the URL (``request_options``):
    # name → (int or float, lowest, highest), or a tuple of the words allowed. A layer with options takes them in
    # ``with_options``; an unknown value is 400 ``bad_option`` naming the option and what it accepts.
    OPTIONS: ClassVar[dict[str, tuple]] = {}
    # The axes of each model input that vary from call to call, kept dynamic when the model is exported to ONNX:
    # one tuple per input. Default: one input, batched on its first axis.
    DYNAMIC_AXES: ClassVar[tuple[tuple[int, ...], ...]] = ((0,),)

    def initialize(self, context) -> None:
        """Load the archive's model on its runtime (``handlers/runtime.py``) and warm it up."""
        self.context = context
        self.manifest = context.manifest
        self.settings = self.load_settings(getattr(context, "model_yaml_config", None) or {})
        threads = int(self.settings["threads"])
        properties = context.system_properties
        self.files = Path(properties["model_dir"])
        gpu = properties.get("gpu_id")
        self.device = "cpu" if gpu is None else f"cuda:{gpu}"
        self.configure()
        self.model_pt_path = str(self.files / self.manifest["model"]["serializedFile"])
        self.runtime = runtime_of(self.model_pt_path)
        self.model = load_model(self.model_pt_path, self.device, threads, bool(self.settings["optimize_for_inference"]))
        self.mapping = load_label_mapping(str(self.files / "index_to_name.json"))
        self.version = self.manifest.get("model", {}).get("modelVersion", "")
        self.metrics = HandlerMetrics(context)
        self.metrics.accuracy(self.build_record().get("accuracy"))
        self.explainer_model = None
        example = as_args(self.example_input())
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

    # --- the three steps of a batch ------------------------------------------------------------------------------

    def handle(self, data: list, context) -> list:
        """One batch from TorchServe: one answer per request, in order (bytes, see ``encode_answer``)."""
        started = time.perf_counter()
        self.context = context
        answers = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return answers

    def preprocess(self, data: list) -> Batch:
        batch = Batch(size=len(data))
        with batch.timed("preprocess"):
            for idx, row in enumerate(data):
                if self.context.get_request_header(idx, "explain") == "True":
                    batch.explain.add(idx)
                with self.refusals(batch, idx, "decoding"):
                    item = self.decode(self.payload(self.unwrap(row, idx)))
                    batch.items[idx] = self.with_options(item, self.request_options(idx)) if self.OPTIONS else item
            self.admit(batch)
            if batch.predicted:
                batch.inputs = self.collate([batch.items[idx] for idx in batch.predicted])
        return batch

    def admit(self, batch: Batch) -> None:
        """Keep the batch's work within the layer's ``budget()``: its requests in order, each counted by ``cost``;
        one past the budget is answered 503 ``busy`` (the front door sends it once more, TorchServe puts it in a
        later batch). The first always runs: a single request's own bounds keep it within budget."""
        limit = self.budget()
        if limit is None:
            return
        budget, unit = limit
        spent = 0
        for idx in sorted(batch.items):
            cost = self.cost(batch.items[idx], idx in batch.explain)
            if spent and spent + cost > budget:
                del batch.items[idx]
                batch.errors[idx] = InputError("busy", f"this batch already holds {spent:,} of its {budget:,} "
                                                       f"{unit}; this request's {cost:,} would go past it: send "
                                                       "it again shortly", status=503)
            else:
                spent += cost

    @contextmanager
    def refusals(self, batch: Batch, idx: int, step: str):
        """One request's step: its InputError becomes its answer; any other exception too, as 500
        ``internal_error`` (a bug, logged with its traceback), so that its neighbours in the batch are answered."""
        try:
            yield
        except InputError as error:
            logger.info("request %d of %d refused: %s: %s", idx, batch.size, error.reason, error.message)
            batch.errors[idx] = error
        except Exception as error:  # noqa: BLE001 (one request's failure must not fail its batch)
            logger.exception("request %d of %d failed in %s", idx, batch.size, step)
            batch.errors[idx] = InputError("internal_error", f"{step} the request failed: {type(error).__name__}",
                                           status=500)

    def unwrap(self, row: Any, idx: int) -> Any:
        """The row as TorchServe would have passed it without the front door: a multipart body the front door
        relabelled (``X-Original-Content-Type: multipart/form-data``) is parsed here, into its chosen part."""
        original = request_header(self.context, idx, FORM_HEADER)
        if not original or not original.strip().lower().startswith("multipart/form-data"):
            return row
        if not isinstance(row, dict) or not isinstance(row.get("body"), (bytes, bytearray)):
            return row
        return {"body": form_payload(bytes(row["body"]), original, int(self.settings["max_form_parts"]))}

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        with batch.timed("inference"):
            if batch.inputs is not None:
                outputs = self.forward(self.model, batch.inputs)
                predicted = batch.predicted
                batch.answers.update(zip(predicted, self.answer(outputs, [batch.items[idx] for idx in predicted])))
            for idx in sorted(batch.explain & batch.items.keys()):
                with self.refusals(batch, idx, "explaining"):
                    self.admit_explanation(batch.items[idx])
                    batch.answers[idx] = self.explanation(batch.items[idx])
        return batch

    def postprocess(self, batch: Batch) -> list:
        limit = int(self.settings["max_answer_bytes"])
        with batch.timed("postprocess"):
            responses = []
            for idx in range(batch.size):
                self.context.set_response_header(idx, VERSION_HEADER, self.version)
                reply = batch.answers.get(idx)
                if idx not in batch.errors and not isinstance(reply, Reply):
                    reply = Reply(reply)
                body = None if idx in batch.errors else encode_answer(reply.body)
                if body is not None and len(body) > limit:
                    batch.errors[idx] = InputError(
                        "answer_too_large", f"the answer would be {len(body):,} bytes; the limit is {limit:,} "
                        "(max_answer_bytes): send less in one request", status=413)
                error = batch.errors.get(idx)
                if error is not None:
                    self.context.set_response_status(error.status, error.phrase, idx)
                    self.context.set_response_content_type(idx, "application/json")
                    responses.append(encode_answer(error.body()))
                    continue
                self.context.set_response_content_type(idx, reply.content_type)
                for key, value in reply.headers.items():
                    self.context.set_response_header(idx, key, value)
                responses.append(body)
        answered = [batch.answers[idx] for idx in batch.predicted if idx not in batch.errors]
        classes = [name for name in map(self.top_class, answered) if name is not None]
        self.metrics.record(batch.size, batch.seconds, classes,
                            [(error.reason, error.status) for error in batch.errors.values()])
        return responses

    # --- explanations: Integrated Gradients on the TorchScript weights -------------------------------------------

    def explainer(self):
        """The TorchScript export without optimize_for_inference (its fused kernels have no gradients, and ONNX
        Runtime computes none): loaded on the first explanation, a second copy of the weights in memory from then on.
        Archives of a model that explains ship it beside an ONNX file for this, except where the model came as an
        ONNX file: nothing to take gradients of, 400 ``no_explanations``. Where torch is not installed (a serving
        image whose versions all run on ONNX Runtime), 501 ``no_explanations``: this server cannot, another could."""
        if self.explainer_model is None:
            name = self.require_torch()
            if not (self.files / TORCHSCRIPT_FILE).exists():
                raise InputError("no_explanations", f"{name} was built from an ONNX file: explanations need the "
                                 "model's gradients, which only torch weights give")
            self.explainer_model = load_torchscript(self.files / TORCHSCRIPT_FILE, self.device,
                                                    optimize_for_inference=False)
        return self.explainer_model

    def require_torch(self) -> str:
        """This version's name, where torch is installed; else 501 ``no_explanations`` (a serving image built without
        the torch group answers predictions only: another server could explain, this one cannot)."""
        name = f"{self.manifest['model']['modelName']} {self.version}"
        if not torch_installed():
            raise InputError("no_explanations", f"{name}: this server has no torch, which explanations need "
                             "(an image built without the torch group); ask /predictions", status=501)
        return name

    def as_tensors(self, *arrays) -> tuple:
        """Arrays as torch tensors on the explanations' device (explanations only: this imports torch)."""
        self.require_torch()
        import torch

        device = torch_device(self.device)
        return tuple(torch.from_numpy(np.ascontiguousarray(array)).to(device) for array in arrays)

    def integrated_gradients(self, function, inputs, baselines, target=None,
                             additional_forward_args=None) -> tuple[Any, float]:
        """Attributions of ``function(inputs)`` (one score per row, or ``target`` picks the column) to ``inputs``,
        integrated along the straight line from ``baselines``; and the convergence delta (how far their sum is
        from ``function(inputs) - function(baselines)``). ``explain_steps`` and ``explain_batch`` bound the cost."""
        import torch
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
        """One request's payload → one item (an array, or anything collate takes); raises InputError for bad input."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        """The decoded items of the good requests → what ``forward`` takes (numpy arrays)."""
        return np.stack(items)

    def forward(self, model, inputs: Any) -> Any:
        """Run the model on collated inputs (the build's parity check runs the eager model through this too)."""
        return model(*as_args(inputs))

    def example_input(self) -> Any:
        """One model call's input, batch of one (an array, or a tuple of arrays): for warm-up and tracing."""
        raise NotImplementedError

    def answer(self, outputs: Any, items: list) -> list:
        """Model outputs for the good requests → one answer each, in order: JSON-serialisable, or a ``Reply``."""
        raise NotImplementedError

    def label(self, index: int) -> str:
        """A class index's name from ``index_to_name.json`` (a list such as ["n01440764", "tench"] by its last
        item), or its number where it has none."""
        name = (getattr(self, "mapping", None) or {}).get(str(index), str(index))
        return name[-1] if isinstance(name, list) else name

    def top_class(self, answer: Any) -> str | None:
        """The class a prediction's answer names first, counted per version (class drift); None: it names none."""
        return None

    def request_options(self, idx: int) -> dict[str, Any]:
        """The request's own values of the layer's ``OPTIONS``, from its URL's query string: TorchServe passes a
        handler the headers but not the URL, so the front door sends the query string on in ``X-Query`` (a client
        of TorchServe's own port sends that header itself). Other parameters are left to other layers."""
        query = request_header(self.context, idx, QUERY_HEADER) or ""
        given = {}
        for name, values in parse_qs(query[:MAX_QUERY_CHARS], keep_blank_values=True).items():
            if name in self.OPTIONS:
                given[name] = parse_option(name, values[-1].strip(), self.OPTIONS[name])
        return given

    def with_options(self, item: Any, options: dict[str, Any]) -> Any:
        """One decoded request with the options it set (``OPTIONS``); a layer with options overrides this."""
        return item

    def budget(self) -> tuple[int, str] | None:
        """The most work one batch may hold, in ``cost``'s unit, and the unit's name (for the 503's message), so that
        a full batch ends well within responseTimeout; None: the layer's inputs are of fixed size, batchSize bounds
        the batch."""
        return None

    def cost(self, item: Any, explained: bool) -> int:
        """The work one decoded request asks of a batch, in ``budget``'s unit."""
        return 1

    def admit_explanation(self, item: Any) -> None:
        """Refuse (InputError) an explanation that would cost more than the layer's bounds, before computing it."""

    def explanation(self, item: Any) -> Any:
        """One request's explanation (see ``integrated_gradients``); a layer that can explain overrides this."""
        name = self.context.manifest.get("model", {}).get("modelName", "this model")
        raise InputError("no_explanations", f"{name} does not explain its outputs; ask /predictions/{name}")
