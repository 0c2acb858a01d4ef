"""Bring your own model: ``python -m manage import NAME FROM [options]`` (``make import NAME=.. FROM=..``).

One command from a user's file to a served, accuracy-gated version, with no code:

1. **what FROM is**, from the file: a Hugging Face ``save_pretrained`` folder (``config.json``), an ONNX file, a
   TorchScript file (a zip with ``code/``), or a checkpoint (``.pt .pth .ckpt .bin .safetensors``) that needs
   ``--arch`` (``torchvision:<name>``, ``timm:<name>`` or ``<module>:<Class>`` from ``--code``);
2. **the spec**: the handler (images: ``image_classifier``; Hugging Face: ``text_classifier`` or
   ``sentence_embedding``), the labels (``--labels``, else the class folders of an image ``--eval``, else
   ``id2label``, else ImageNet's for a 1000-class head), the number of classes (from the head's weights), the
   preprocessing (``--transform``, else timm's pretrained config, else the ONNX graph's input size; anything assumed
   says so in a comment), the runtime and the server settings;
3. **write** ``archives/<NAME>.yaml`` with comments, or add the version to the model's spec (the next version, or
   ``--version``); a version whose settings differ from the model's carries its own;
4. **build** it (``build_mar``: export, parity, served preprocessing against ``--transform``, held-out accuracy and
   ``--min-accuracy``, archive, loaded as a TorchServe worker loads it); a build that fails takes its version back
   out of the spec (``withdraw``);
5. **register** it if TorchServe is running: a new model becomes its own default, a new version does not.

``quantize_version`` (``make quantize``, ``QUANTIZE=int8`` on ``make import``) adds a version the same way: one of the
model's versions quantized to INT8 (export/quantize.py), built, gated against that version, withdrawn if refused.

NAME and VERSION are checked by the one rule (``archives.check_model_name``, ``check_version``) before anything is
read or written. Imports may run at the same time: the next version is chosen and its block added under a lock on
the folder of specs (``archives.store.locked``), and a spec is replaced whole, and only once the new text loads as a
spec (``replace_file``), so a spec that would break the build never lands. Withdrawing re-reads the spec under the
lock and removes exactly the lines this import added: versions other imports added meanwhile stay.

Every refusal is one line (``error: ...``) and exit status 1.
"""

from __future__ import annotations

import datetime as dt
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from archives import SPECS_DIR, SpecError, add_version, check_model_name, check_version, load_spec, load_specs
from archives import next_version
from archives.store import REPO, Manifest, locked, replace_file
from handlers import IMAGE_TASKS, TASK_HANDLERS

logger = logging.getLogger(__name__)

LIBRARIES = ("torchvision:", "timm:")
FIRST_VERSION = "1.0"
IMAGENET_CLASSES = 1000
DETECTION_BACKGROUND, DETECTION_GAP = "__background__", "N/A"  # torchvision's names for index 0 and unused ids
EVAL_LAYOUTS = {
    "classification": "an image folder, <root>/<class>/<image>",
    "detection": "a folder of images/ and annotations.json (COCO)",
    "segmentation": "a folder of images/ and masks/ (PNG class indices, the same file stem)",
    "multilabel": "a CSV of image,labels (labels joined by |), the images beside it",
}
TASK_SETTINGS = {"classification": ("resize", "crop", "mean", "std"), "multilabel": ("resize", "crop", "mean", "std"),
                 "segmentation": ("resize", "mean", "std"), "detection": ()}
TASK_NOTES = {"classification": "assumed: the usual ImageNet evaluation; pass TRANSFORM= to take your own",
              "multilabel": "assumed: the usual ImageNet evaluation; pass TRANSFORM= to take your own",
              "segmentation": "assumed: torchvision's segmentation evaluation; pass TRANSFORM= to take your own",
              "detection": ""}
EXPORT_NOTES = {"trace": "trace, keeping the methods explanations use", "script": "scripted: keeps what varies"}
IMAGENET_LABELS = "package:imagenet_classes/imagenet1k_label_to_names.json"
ASSUMED_CROP_RATIO = 0.875  # resize = crop / 0.875 (256 for 224), the usual ImageNet evaluation
TOP_K = 5
SHOWN_SETTINGS = ("resize", "interpolation", "crop", "mean", "std")  # written even where they are the defaults
SERVER_SETTINGS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 30}
EXPLAINED_METHODS = ["embed_tokens", "encode_embeddings"]  # Hugging Face models: explanations attribute between


class Refused(RuntimeError):
    """An import this toolkit will not do, in one line the user can act on (the command line prints it)."""

@dataclass
class Request:
    """The command line: what the user asked for."""

    name: str
    source: Path
    arch: str | None = None
    eval: Path | None = None
    labels: Path | None = None
    transform: str | None = None
    code: Path | None = None
    version: str | None = None
    runtime: str | None = None
    min_accuracy: float | None = None
    allow_pickle: bool = False
    task: str | None = None  # classification, detection, segmentation or multilabel (images); default from ARCH
    args: dict[str, Any] | None = None  # the architecture's constructor arguments (ARGS, JSON): min_size=, ...
    label_order: str | None = None  # "found": take the label order the EVAL check finds


@dataclass
class Plan:
    """What the import writes: the model's parts of the spec and the version's, each value with its comment."""

    handler: str
    description: str
    labels: Any = None  # a list of names, a file reference or None
    labels_note: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    runtime_given: bool = False
    runtime_reason: str | None = None  # why not ONNX Runtime, where it is not
    export: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # setting → where it came from
    extra: dict[str, Any] = field(default_factory=dict)  # eval, min_accuracy, transform


def kind_of(path: Path) -> str:
    """What FROM is, from the file itself."""
    from export.checkpoint import CHECKPOINT_SUFFIXES

    if not path.exists():
        raise Refused(f"FROM {path} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "huggingface"
        raise Refused(f"FROM {path} is a folder without config.json: a folder must be a Hugging Face model saved "
                         "with save_pretrained")
    if path.suffix == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name and name.endswith(".py") for name in archive.namelist()):
                return "torchscript"
    if path.suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    raise Refused(f"FROM {path.name}: not a file we can import; FROM is a checkpoint "
                     f"({' '.join(CHECKPOINT_SUFFIXES)}) with ARCH, a TorchScript file, an .onnx file or a Hugging "
                     "Face folder")


def reference(path: Path) -> str:
    """A path as the spec records it: relative to the repository when inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --- working out the spec ----------------------------------------------------------------------------------------


def image_task(request: Request) -> str:
    """TASK, else what a torchvision architecture is built for, else classification; EVAL's layout must fit it."""
    from export.datasets import eval_kind
    from export.tasks import task_of_arch

    task = request.task or task_of_arch(request.arch) or "classification"
    if task not in IMAGE_TASKS:
        raise Refused(f"TASK {task!r} is not one of {', '.join(IMAGE_TASKS)}")
    if request.eval:
        layout = eval_kind(request.eval)
        if layout != task:
            raise Refused(f"EVAL {request.eval.name} is laid out for {layout}, but the model is imported for "
                             f"{task}: {EVAL_LAYOUTS[task]}")
    if task == "detection" and request.transform:
        raise Refused("TRANSFORM: a torchvision detector resizes and normalises inside the model (its transform "
                         "is part of the weights); import it without TRANSFORM")
    return task


def image_plan(request: Request, kind: str, task: str) -> tuple[Plan, int | None]:
    """The plan for an image model of ``task`` and the number of outputs (classes) its model has, where the model
    says (a detector's come from its labels)."""
    import torch

    from export import architecture
    from export.checkpoint import head_size, load_weights, read_checkpoint
    from export.tasks import EXPORTS, TORCHSCRIPT_ONLY
    from handlers import handler_class

    handler = handler_class(TASK_HANDLERS[task])
    plan = Plan(handler=TASK_HANDLERS[task], description=f"imported {task} from {request.source.name}")
    source: dict[str, Any] = {"type": kind, "path": reference(request.source)}
    settings = {k: handler.DEFAULTS[k] for k in TASK_SETTINGS[task]}
    notes = {k: TASK_NOTES[task] for k in settings}
    code = request.code or request.source.parent
    model = None
    if kind == "checkpoint":
        checkpoint = read_checkpoint(request.source, allow_pickle=request.allow_pickle,
                                     code=code if request.allow_pickle else None)
        if checkpoint.entry:
            source["entry"] = checkpoint.entry
        if request.allow_pickle:  # the pickled classes are imported from CODE
            source.update(unsafe_pickle=True, code=reference(code))
        if checkpoint.module is not None:
            model = checkpoint.module.eval()
        else:
            if not request.arch:
                raise Refused(f"{request.source.name} holds weights without an architecture: name it with ARCH="
                                 "torchvision:<name>, timm:<name> or <module>:<Class>")
            users = None if request.arch.startswith(LIBRARIES) else code  # the user's own class comes from CODE
            classes = head_size(checkpoint.state) if task != "detection" else detector_classes(request)
            args = architecture.infer_args(request.arch, classes, request.args, users)
            source.update(arch=request.arch, args=args, **({"code": reference(users)} if users else {}))
            model = architecture.create(request.arch, args, users)
            load_weights(model, checkpoint.state, name=request.arch)  # a misfit is named before a spec is written
        if request.arch and request.arch.startswith("timm:") and not request.transform:
            from export.preprocessing import settings_from_timm

            settings = settings_from_timm(model)
            notes = {k: f"timm's pretrained config for {request.arch}" for k in settings}
    elif kind == "torchscript":
        model = torch.jit.load(str(request.source), map_location="cpu").eval()
    else:
        crop = onnx_input_size(request.source)
        if crop:
            settings.update(crop=crop, resize=round(crop / ASSUMED_CROP_RATIO))
            notes["crop"] = "the ONNX graph's input size"
    if request.transform:
        from export.preprocessing import load_transform, settings_from_transform

        settings = settings_from_transform(load_transform(request.transform, code), task == "segmentation")
        if task == "segmentation":  # the whole image: a crop would cut the class map
            if settings.get("crop") is not None:
                raise Refused("TRANSFORM: a segmenter's transform crops the image; the class map answers every "
                                 "pixel of the image as sent: pass the transform without its CenterCrop")
            settings.pop("crop", None)
        notes = {k: f"from TRANSFORM {request.transform}" for k in settings}
        plan.extra["transform"] = {"name": request.transform, "code": reference(code)}
    outputs = None if task == "detection" else classes_of(model, request.source, {**settings, "crop": settings.get(
        "crop", handler.DEFAULTS["crop"])}, task)
    settings = {k: v for k, v in settings.items() if k in SHOWN_SETTINGS or v != handler.DEFAULTS.get(k)}
    plan.source, plan.settings, plan.notes = source, settings, notes
    if task == "classification":
        plan.settings["top_k"] = min(TOP_K, outputs)
        plan.notes["top_k"] = f"never more than the {outputs} classes"
    if task == "multilabel":
        plan.settings["threshold"] = handler.DEFAULTS["threshold"]
        plan.notes["threshold"] = "a label at or above this probability is answered"
        if request.eval:
            plan.settings["thresholds"] = "f1"
            plan.notes["thresholds"] = "each label's own, chosen on EVAL for its best F1 (the build records them)"
    if task == "detection":
        plan.settings.update(threshold=handler.DEFAULTS["threshold"], max_detections=handler.DEFAULTS["max_detections"])
        plan.notes.update(threshold="the lowest score answered (?threshold= per request)",
                          max_detections="the most boxes answered (?max_detections= per request)")
    plan.runtime = request.runtime or ("torchscript" if kind == "torchscript" else "onnxruntime")
    if task in EXPORTS and kind == "checkpoint":
        plan.export = EXPORTS[task]
    if task in TORCHSCRIPT_ONLY and kind == "checkpoint" and not request.runtime:
        plan.runtime, plan.runtime_reason = "torchscript", TORCHSCRIPT_ONLY[task]
    return plan, outputs


def detector_classes(request: Request) -> int:
    """A detector's number of classes, background included: its labels' count (LABELS, else EVAL's categories)."""
    labels = task_labels(request, "detection")[0] if not request.labels else None
    if request.labels:
        from export.datasets import read_labels

        return len(read_labels(request.labels))
    if labels is None:
        raise Refused("a detector's number of classes comes from its labels: pass LABELS= (background first, "
                         "as torchvision counts it) or an EVAL folder with annotations.json")
    return len(labels)


def task_labels(request: Request, task: str) -> tuple[list[str] | None, str]:
    """The labels EVAL implies for ``task``, and where they came from."""
    from export.datasets import class_folders, read_eval

    if not request.eval:
        return None, ""
    if task == "classification":
        return class_folders(request.eval), "the class folders of EVAL, sorted (ImageFolder's rule)"
    if task == "detection":
        categories = read_eval(request.eval, "detection").categories
        names = [DETECTION_GAP] * (max(categories) + 1)
        names[0] = DETECTION_BACKGROUND
        for index, name in categories.items():
            names[index] = name
        return names, "EVAL's categories by id (index = category_id, 0 = background, as torchvision trains)"
    if task == "multilabel":
        return read_eval(request.eval, "multilabel").names, "the label names in EVAL, sorted"
    return None, ""


def onnx_input_size(path: Path) -> int | None:
    """The image size an ONNX graph's first input fixes (N x C x H x W with H == W), if it fixes one."""
    import onnx

    shape = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in shape]
    return sizes[2] if len(sizes) == 4 and sizes[2] and sizes[2] == sizes[3] else None


def classes_of(model, source: Path, settings: dict, task: str = "classification") -> int:
    """The number of outputs: the model run once on the handler's own example input (the served shape); a
    segmenter's classes are its outputs' second axis."""
    from handlers.runtime import numpy_model
    from handlers.vision import ImageHandler

    example = ImageHandler.from_config({"handler": settings}).example_input()
    if model is None:
        from export.onnx import OnnxReference

        model = OnnxReference(source)
    elif task == "segmentation":
        from export.tasks import served_module

        model = served_module(model, task, example)
    outputs = numpy_model(model)(example)
    outputs = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return int(outputs.shape[1] if outputs.ndim == 4 else outputs.shape[-1])


def text_plan(request: Request) -> tuple[Plan, int | None]:
    from export import huggingface

    task = huggingface.task_of(request.source)
    plan = Plan(handler="text_classifier" if task == "text_classification" else "sentence_embedding",
                description=f"imported {task.replace('_', ' ')} from {request.source.name}/")
    plan.source = {"type": "huggingface", "path": reference(request.source), "task": task}
    plan.settings = {"max_tokens": huggingface.max_tokens(request.source)}
    plan.notes = {"max_tokens": "the model's own limit (its config and tokenizer)"}
    plan.export = {"method": "trace", "freeze": True, "preserve": EXPLAINED_METHODS}
    plan.runtime = request.runtime or "onnxruntime"
    if request.transform:
        raise Refused("TRANSFORM is for image models; a Hugging Face model's preprocessing is its tokenizer")
    if request.task:
        raise Refused(f"TASK is for image models; {request.source.name}/ is a Hugging Face {task.replace('_', ' ')}"
                         " model")
    labels = huggingface.labels_of(request.source)
    if labels is not None:
        plan.settings["top_k"] = min(TOP_K, len(labels))
        plan.notes["top_k"] = f"never more than the {len(labels)} classes"
        plan.labels_note = "id2label of the model's config.json"
    return plan, None if labels is None else len(labels)


def decide_labels(request: Request, plan: Plan, outputs: int | None, task: str | None = None) -> None:
    """LABELS, else what an image EVAL implies (class folders, a COCO file's categories, a multi-label CSV's
    names), else id2label (the source's), else ImageNet's for a 1000-class head; their count must be the model's
    number of outputs."""
    from export.datasets import read_labels

    count = None
    implied, note = task_labels(request, task) if task else (None, "")
    if request.labels:
        count = len(read_labels(request.labels))
        plan.labels, plan.labels_note = reference(request.labels), "LABELS"
    elif implied is not None:
        plan.labels, plan.labels_note, count = implied, note, len(implied)
    elif plan.labels_note:  # id2label
        count = outputs
    elif outputs == IMAGENET_CLASSES:
        plan.labels, plan.labels_note, count = IMAGENET_LABELS, "assumed: a 1000-class head is ImageNet-1k", outputs
    if count is not None and outputs is not None and count != outputs:
        raise Refused(f"the labels ({plan.labels_note}) name {count} classes but the model has {outputs} outputs")
    if count is None and plan.handler != "sentence_embedding":
        plan.labels_note = "none given: answers name class indices; pass LABELS= or an EVAL folder"


def plan_import(request: Request) -> Plan:
    kind = kind_of(request.source)
    if kind == "huggingface":
        if request.eval and request.eval.suffix not in (".csv", ".jsonl"):
            raise Refused(f"EVAL {request.eval.name}: a text model is evaluated on a .csv or .jsonl file of text "
                             "and label")
        plan, outputs = text_plan(request)
        task = None
    else:
        task = image_task(request)
        plan, outputs = image_plan(request, kind, task)
    decide_labels(request, plan, outputs, task)
    plan.runtime_given = request.runtime is not None
    if request.eval:
        plan.extra["eval"] = reference(request.eval)
    if request.min_accuracy is not None:
        if not request.eval:
            raise Refused("MIN_ACCURACY needs EVAL: the held-out set it is measured on")
        plan.extra["min_accuracy"] = request.min_accuracy
    return plan


# --- writing the spec --------------------------------------------------------------------------------------------


def flow(value: Any) -> str:
    """A value on one line of YAML."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...").strip()


def entry(key: str, value: Any, indent: int, comment: str = "") -> str:
    text = f"{' ' * indent}{key}: {flow(value)}"
    return f"{text:<38} # {comment}" if comment else text


def version_block(request: Request, version: str, plan: Plan, overrides: dict[str, Any]) -> list[str]:
    lines = [f'  "{version}":', entry("description", f"{plan.description} ({dt.date.today().isoformat()})", 4),
             "    source:                           # export/sources.py"]
    lines += [entry(key, value, 6) for key, value in plan.source.items()]
    note = "given" if plan.runtime_given else "the default; torchscript where the ONNX export fails"
    lines.append(entry("runtime", plan.runtime, 4, "see runtime_reason" if plan.runtime_reason else note))
    if plan.runtime_reason:
        lines.append(entry("runtime_reason", plan.runtime_reason, 4))
    if plan.export:
        lines.append(entry("export", plan.export, 4, EXPORT_NOTES.get(plan.export["method"], "")))
    comments = {"eval": "held-out accuracy, measured at build time through the served preprocessing",
                "min_accuracy": "the build refuses a version under this first figure (top-1, mAP@0.5, mean IoU, AUROC)",
                "transform": "your evaluation transform: the build checks the served preprocessing against it"}
    lines += [entry(key, value, 4, comments[key]) for key, value in plan.extra.items()]
    if overrides:
        lines += ["    model_config:                     # this version's own handler settings",
                  "      handler:"]
        lines += [entry(key, value, 8, plan.notes.get(key, "")) for key, value in overrides.items()]
    return lines


def model_text(request: Request, version: str, plan: Plan, block: list[str]) -> str:
    """A new model's spec, its one version ``block``."""
    lines = [f"# {request.name}: imported with `make import` from {request.source.name} "
             f"on {dt.date.today().isoformat()}.",
             "# A spec like every other in this folder: edit it, then `make archive MODEL=<name>`. A built version is",
             "# immutable; `make import NAME=<name> FROM=...` adds the next one.",
             entry("name", request.name, 0),
             entry("description", plan.description, 0),
             entry("handler", plan.handler, 0, f"handlers/{plan.handler}.py"),
             entry("default_version", version, 0)]
    if plan.labels is not None:
        lines.append(entry("labels", plan.labels, 0, plan.labels_note))
    elif plan.labels_note:
        lines.append(f"# labels: {plan.labels_note}")
    lines += ["", "versions:", *block, "",
              "model_config:                       # the archive's model-config.yaml, as TorchServe reads it"]
    lines += [entry(key, value, 2) for key, value in SERVER_SETTINGS.items()]
    lines += ["  handler:                          # handlers/ settings: preprocessing and limits",
              entry("threads", 1, 4, "threads per worker: workers x threads <= cores")]
    lines += [entry(key, value, 4, plan.notes.get(key, "")) for key, value in plan.settings.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Written:
    """A version an import wrote into a spec: what withdrawing it takes out again."""

    path: Path
    version: str
    block: list[str]  # the lines of its version, as added
    created: bool  # the import wrote the file: the model is new


def write_spec(request: Request, plan: Plan, specs_dir: Path) -> Written:
    """Write the spec, or add the version to it, under the lock on the folder of specs: the version is chosen from
    the spec as it is then, and the spec is replaced only by text that loads."""
    if not specs_dir.is_dir():
        raise Refused(f"the folder of specs {specs_dir} does not exist")
    with locked(specs_dir):
        try:
            specs = load_specs(specs_dir)
        except SpecError as error:
            raise Refused(str(error)) from None
        existing = specs.get(request.name)
        if existing is None:
            version = request.version or FIRST_VERSION
            path = specs_dir / f"{request.name}.yaml"
            if path.exists():
                raise Refused(f"{path} exists but defines another model; choose another NAME")
            block = version_block(request, version, plan, {})
            replace_spec(path, model_text(request, version, plan, block))
            return Written(path, version, block, created=True)
        return add_to_spec(request, plan, existing)


def add_to_spec(request: Request, plan: Plan, existing) -> Written:
    """The version added to an existing model's spec (``existing``, as loaded under the lock)."""
    version = request.version or next_version(list(existing.versions))
    if version in existing.versions:
        raise Refused(f"{request.name} already has version {version} ({existing.path.name}); a built version is "
                         f"immutable: leave VERSION out for the next one, {next_version(list(existing.versions))}")
    default = existing.versions[existing.default_version]
    if default.handler != plan.handler:
        raise Refused(f"{request.name} is served by {default.handler}; this model needs {plan.handler}: import it "
                         "under another NAME")
    if plan.labels is not None and plan.labels != default.labels:
        raise Refused(f"{request.name}'s labels are {flow(default.labels)[:120]}; this version's would be "
                         f"{flow(plan.labels)[:120]}: labels belong to the model, import it under another NAME")
    current = default.handler_settings
    overrides = {k: v for k, v in plan.settings.items() if current.get(k) != v}
    block = version_block(request, version, plan, overrides)
    replace_spec(existing.path, add_version(existing.path.read_text(), block))
    return Written(existing.path, version, block, created=False)


def replace_spec(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` once ``text`` loads as a spec; else Refused, and ``path`` as it was."""
    def loads(written: Path) -> None:
        try:
            load_spec(written)
        except SpecError as error:
            raise Refused(f"{path}: not written: {str(error).removeprefix(f'{written}: ')}") from None

    replace_file(path, text, check=loads)


def withdraw(written: Written) -> None:
    """The version an import wrote taken back out of its spec (its build failed): the spec read again under the
    lock, exactly the version's lines removed, the versions other imports added since kept. A spec left without
    versions is removed; one whose default was this version takes its lowest remaining one."""
    path, version, block = written.path, written.version, written.block
    with locked(path.parent):
        lines = path.read_text().splitlines() if path.exists() else []
        start = next((i for i in range(len(lines)) if lines[i:i + len(block)] == block), None)
        if start is None:
            raise Refused(f"{path}: version {version} was changed or removed since this import wrote it; "
                             "check the spec by hand")
        lines = lines[:start] + lines[start + len(block):]
        raw = yaml.safe_load("\n".join(lines))
        remaining = sorted(raw.get("versions") or {}, key=lambda v: tuple(int(p) for p in v.split(".")))
        if not remaining:
            path.unlink()
            return
        if str(raw.get("default_version")) == version:
            at = next(i for i, line in enumerate(lines) if line.startswith("default_version:"))
            lines[at] = entry("default_version", remaining[0], 0, f"{version} was withdrawn: its build failed")
        replace_spec(path, "\n".join(lines) + "\n")


# --- the command -------------------------------------------------------------------------------------------------


def import_model(request: Request, specs_dir: Path = SPECS_DIR) -> tuple[dict, bool]:
    """Write the spec and build the version: its build record, and whether the model is new (then the version is
    its default). Registering it with a running TorchServe is the command line's step."""
    try:
        check_model_name(request.name)
        if request.version is not None:
            check_version(request.version)
    except SpecError as error:
        raise Refused(str(error)) from None
    import build_mar

    request.source = request.source.expanduser().resolve()
    try:
        plan = plan_import(request)
    except build_mar.USER_ERRORS as error:
        raise Refused(str(error)) from None
    while True:
        written = write_spec(request, plan, specs_dir)
        try:
            spec = load_spec(written.path)
            [record] = build_mar.build({spec.name: spec}, [spec.versions[written.version]], Manifest())
            break
        except BaseException as error:  # an interrupted build takes its version back too
            try:
                withdraw(written)
            except Refused as stuck:
                raise Refused(f"{error}; and {stuck}") from None
            if not isinstance(error, (build_mar.BuildError, SpecError)):
                raise
            if isinstance(error, build_mar.BuildError) and error.found_labels and request.label_order == "found":
                logger.warning("taking the label order found on EVAL: %s", error.found_labels)
                plan.labels, plan.labels_note = error.found_labels, "the order found on EVAL (LABEL_ORDER=found)"
                continue
            if plan.runtime_given or plan.runtime != "onnxruntime" or "torch.export could not capture" not in str(error):
                raise Refused(str(error)) from None
            logger.warning("ONNX export failed (%s); importing on TorchScript instead", str(error)[:200])
            plan.runtime = "torchscript"
            plan.runtime_reason = f"the ONNX export failed: {str(error).partition('refused: ')[2][:300]}"
    return record, written.created


def quantize_version(name: str, version: str | None = None, max_drop: float | None = None,
                     calibration: Path | None = None, specs_dir: Path = SPECS_DIR, **gate: float | None) -> dict:
    """A new version of NAME: VERSION (default: the default version) quantized to INT8 under the next free version
    number, written, built and gated like any version (not made the default), withdrawn where its build fails;
    ``gate``: the gate's min_agreement and min_cosine, where given."""
    import build_mar
    from export.quantize import version_block

    with locked(specs_dir):
        try:
            spec = load_specs(specs_dir).get(check_model_name(name))
            fp32 = spec and spec.versions.get(check_version(version) if version else spec.default_version)
            if fp32 is None or fp32.quantize:
                raise Refused(f"{name} {fp32.version} is already INT8: name its fp32 version" if fp32 else
                              f"{name} {version or ''}: no such model, or no such version, in {specs_dir}")
            new = next_version(list(spec.versions))
            block = version_block(new, fp32, max_drop, calibration and reference(calibration), **gate)
            written = Written(spec.path, new, block, created=False)
        except (SpecError, *build_mar.USER_ERRORS) as error:
            raise Refused(str(error)) from None
        replace_spec(spec.path, add_version(spec.path.read_text(), block))
    try:
        model = load_spec(spec.path)
        return build_mar.build({name: model}, [model.versions[written.version]], Manifest())[0]
    except BaseException as error:  # an interrupted build takes its version back too
        withdraw(written)
        if isinstance(error, (build_mar.BuildError, SpecError)):
            raise Refused(str(error)) from None
        raise
