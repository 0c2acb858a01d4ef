"""Model specs: one YAML file per model in this folder (see README, "Add your own model").

A spec names the model, its handler module (``handler``, a file in handlers/), its default version and its versions
(each with the ``source`` of its weights), its labels and other extra files, how to export it, the ``runtime`` that
serves it (``torchscript`` or ``onnxruntime``), and ``model_config``: the model-config.yaml that goes into the archive,
exactly as TorchServe reads it (minWorkers, batchSize, ... at the top, the handler's own settings under
``handler:``). A version may override ``runtime``, ``export`` and ``model_config`` keys.

Labels are a list of names (index order) or a file: a repo-relative or absolute path, or ``package:<module>/<file>``,
holding a JSON index → name map, a JSON list, or one name per line. A source may bring its own (digits, a Hugging Face
``id2label``).

A version may also name what proves it (``make import`` writes these for a user's model):
``eval`` (a held-out set: an image folder in ImageFolder layout, or a CSV / JSONL file of ``text`` and ``label``; the
build measures top-1 and top-5 through the served preprocessing), ``min_accuracy`` (the build refuses a version below
it) and ``transform`` (``{name: "module:attribute", code: folder}``, the torchvision evaluation transform the model
was trained with; the build checks the served preprocessing against it).

A version may be another version quantized to INT8 (``make quantize`` writes these; export/quantize.py builds them):
``source: {type: version, version: "1.1"}`` and ``quantize: {mode: static|dynamic, max_drop: 0.01, calibration:
folder, min_agreement: 0.98, min_cosine: 0.99}``. It is that version (its source, export, eval, min_accuracy,
transform and model_config, each of which it may override) served on ``onnxruntime`` from its fp32 ONNX file
quantized; ``mode`` defaults by handler (static for image classifiers, dynamic for text models), ``max_drop`` to
``DEFAULT_MAX_DROP``, ``calibration`` to the eval set and the gate's ``min_agreement`` (top-1 agreement with fp32) and
``min_cosine`` (embeddings) to ``GATE_DEFAULTS``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPECS_DIR = Path(__file__).resolve().parent
# The one rule for model and version names, checked where a name enters (import, build, register, the front door's
# routes and registration): a name is a path segment, a file name, a URL segment and part of nginx's configuration,
# so it holds nothing any of them would read specially.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION = re.compile(r"^[0-9]{1,9}(?:\.[0-9]{1,9}){0,3}$")
MODEL_KEYS = {"name", "description", "handler", "default_version", "versions", "labels", "extra_files", "export",
              "model_config", "runtime"}
VERSION_KEYS = {"source", "description", "export", "model_config", "runtime", "runtime_reason", "eval", "min_accuracy",
                "transform", "quantize"}
RUNTIMES = ("torchscript", "onnxruntime")
EXPORT_DEFAULTS = {"method": "trace", "freeze": True}
QUANTIZE_KEYS = {"mode", "max_drop", "calibration", "min_agreement", "min_cosine"}
QUANTIZE_MODES = ("static", "dynamic")
DEFAULT_MAX_DROP = 0.01  # the most an INT8 version's first figure may drop below its fp32 version's on the same set
GATE_DEFAULTS = {"min_agreement": 0.98,  # top-1 agreement with fp32 below this is refused (classifiers)
                 "min_cosine": 0.99}  # mean cosine to fp32's embeddings below this is refused (embeddings)
INHERITED = ("export", "model_config", "eval", "min_accuracy", "transform")  # what a quantized version takes over
# The keys of model-config.yaml that TorchServe reads (its ModelConfig), whole numbers with their least value, then
# the others. TorchServe passes over any other key without a word, so a misspelt one ("batchsize") would serve with
# its default; "handler" holds the handler's own settings.
SERVER_NUMBERS = {"minWorkers": 0, "maxWorkers": 0, "batchSize": 1, "maxBatchDelay": 0, "responseTimeout": 1,
                  "startupTimeout": 1, "parallelLevel": 1, "maxRetryTimeoutInSec": 0, "clientTimeoutInMills": 0,
                  "jobQueueSize": 1, "sequenceMaxIdleMSec": 1, "sequenceTimeoutMSec": 1, "maxSequenceJobQueueSize": 1,
                  "maxNumSequence": 1}
SERVER_OTHERS = {"deviceType", "deviceIds", "parallelType", "torchrun", "useJobTicket", "continuousBatching",
                 "sequenceBatching", "asyncCommunication", "useVenv", "handler"}


def resolve_file(reference: str | Path) -> Path:
    """A file a spec names: a path (relative to the repository, or absolute), or ``package:<module>/<path>`` inside
    an installed package (weights and data that ship in registry packages, wherever they are installed)."""
    reference = str(reference)
    if reference.startswith("package:"):
        module, _, relative = reference.removeprefix("package:").partition("/")
        return Path(importlib.import_module(module).__file__).parent / relative
    return SPECS_DIR.parent / Path(reference).expanduser()


class SpecError(ValueError):
    """A spec file that cannot be used, with the file and the problem in the message."""


def check_model_name(name: object) -> str:
    """``name`` if it is a model name by the one rule, else SpecError saying what a name may hold."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise SpecError(f"model name {str(name)[:80]!r} must be 1 to 64 letters, digits, '_' or '-', starting with a "
                        "letter or digit")
    return name


def check_version(version: object) -> str:
    """``version`` if it is a version by the one rule, else SpecError (a quoted string in YAML: "1.0", not 1.0)."""
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise SpecError(f"version {str(version)[:80]!r} must be one to four numbers joined by dots, like \"1.0\" "
                        "(quoted in YAML)")
    return version


@dataclass(frozen=True)
class VersionSpec:
    model: str
    version: str
    handler: str  # a module in handlers/
    source: dict[str, Any]
    description: str
    labels: str | list[str] | None  # names in index order, or a file (see the module docstring)
    extra_files: tuple[str, ...]  # repo-relative paths
    export: dict[str, Any]
    runtime: str  # torchscript | onnxruntime
    model_config: dict[str, Any]  # model-config.yaml as TorchServe reads it; handler settings under "handler"
    eval: str | None = None  # a held-out set (image folder, CSV or JSONL)
    min_accuracy: float | None = None  # top-1 on ``eval`` below this refuses the build
    transform: dict[str, str] | None = None  # {name: "module:attribute", code: folder}: the training eval transform
    runtime_reason: str | None = None  # why this runtime (the import says so where ONNX could not be used)
    quantize: dict[str, Any] | None = None  # {version, mode, max_drop, min_*, calibration}: that version in INT8

    @property
    def archive_name(self) -> str:
        return f"{self.model}_{self.version}.mar"

    @property
    def handler_settings(self) -> dict[str, Any]:
        return dict(self.model_config.get("handler") or {})


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    handler: str
    default_version: str
    description: str = ""
    versions: dict[str, VersionSpec] = field(default_factory=dict)


def load_spec(path: Path) -> ModelSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    if isinstance(raw.get("handler"), dict):
        raise SpecError(f"{path}: 'handler' names a module in handlers/; its settings go under model_config.handler")
    unknown = set(raw) - MODEL_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(MODEL_KEYS)}")
    for key in ("name", "handler", "default_version", "versions"):
        if key not in raw:
            raise SpecError(f"{path}: missing '{key}'")
    try:
        name = check_model_name(raw["name"])
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None
    if not (SPECS_DIR.parent / "handlers" / f"{raw['handler']}.py").is_file():
        raise SpecError(f"{path}: handler {raw['handler']!r} is not a module in handlers/")
    versions = {}
    for version, entry in (raw["versions"] or {}).items():
        try:
            check_version(version)
        except SpecError as error:
            raise SpecError(f"{path}: {error}") from None
        entry = entry or {}
        unknown = set(entry) - VERSION_KEYS
        if unknown:
            raise SpecError(f"{path}: version {version}: unknown keys {sorted(unknown)}; known: {sorted(VERSION_KEYS)}")
        entry, quantize = _made_from(path, version, entry, raw["versions"])
        if "source" not in entry or "type" not in (entry["source"] or {}):
            raise SpecError(f"{path}: version {version}: missing 'source: {{type: ...}}'")
        runtime = entry.get("runtime", raw.get("runtime", RUNTIMES[0]))
        if runtime not in RUNTIMES:
            raise SpecError(f"{path}: version {version}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        minimum = entry.get("min_accuracy")
        if minimum is not None and not (isinstance(minimum, (int, float)) and 0 <= minimum <= 1):
            raise SpecError(f"{path}: version {version}: min_accuracy {minimum!r} must be a number from 0 to 1")
        transform = entry.get("transform")
        if transform is not None and not (isinstance(transform, dict) and isinstance(transform.get("name"), str)
                                          and ":" in transform["name"]):
            raise SpecError(f"{path}: version {version}: transform must be {{name: 'module:attribute', code: folder}}")
        model_config = _merge_model_config(raw.get("model_config") or {}, entry.get("model_config") or {})
        try:
            check_server_settings(model_config)
        except SpecError as error:
            raise SpecError(f"{path}: version {version}: {error}") from None
        labels = raw.get("labels")
        if labels is not None and not isinstance(labels, str) and not (
                isinstance(labels, list) and labels and all(isinstance(n, (str, int)) for n in labels)):
            raise SpecError(f"{path}: labels must be a file or a list of names")
        versions[version] = VersionSpec(
            model=name,
            version=version,
            handler=raw["handler"],
            source=dict(entry["source"]),
            description=entry.get("description", ""),
            labels=labels if labels is None or isinstance(labels, str) else [str(n) for n in labels],
            extra_files=tuple(raw.get("extra_files") or ()),
            export={**EXPORT_DEFAULTS, **(raw.get("export") or {}), **(entry.get("export") or {})},
            runtime=runtime,
            model_config=model_config,
            eval=None if entry.get("eval") is None else str(entry["eval"]),
            min_accuracy=None if minimum is None else float(minimum),
            transform=None if transform is None else {k: str(v) for k, v in transform.items()},
            runtime_reason=None if entry.get("runtime_reason") is None else str(entry["runtime_reason"]),
            quantize=quantize,
        )
    if str(raw["default_version"]) not in versions:
        raise SpecError(f"{path}: default_version {raw['default_version']!r} is not one of {sorted(versions)}")
    return ModelSpec(name=name, path=path, handler=raw["handler"], default_version=str(raw["default_version"]),
                     description=raw.get("description", ""), versions=versions)


def next_version(versions: list[str]) -> str:
    """After the highest version, its last number plus one: 1.0 → 1.1, 2.9 → 2.10."""
    highest = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
    *head, last = highest.split(".")
    return ".".join([*head, str(int(last) + 1)])


def add_version(text: str, block: list[str]) -> str:
    """The spec's text with a version block added at the end of its ``versions:`` mapping, comments kept."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("versions:"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith((" ", "#"))),
               len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[:end] + block + lines[end:]) + "\n"


def _made_from(path: Path, version: str, entry: dict, versions: dict) -> tuple[dict, dict | None]:
    """A version made from another (``source: {type: version, version: X}`` with ``quantize``): X's entry with this
    one's keys over it (model_config merged key by key), served on onnxruntime, and its quantize settings. Any other
    version as it is, and None."""
    where, source, settings = f"{path}: version {version}", entry.get("source") or {}, entry.get("quantize")
    if source.get("type") != "version":
        if settings is not None:
            raise SpecError(f"{where}: quantize: needs source: {{type: version, version: \"<the fp32 version>\"}}")
        return entry, None
    if settings is None:
        raise SpecError(f"{where}: source: a version made from another says how: quantize: {{mode: static|dynamic, "
                        "max_drop: 0.01}")
    if set(source) != {"type", "version"}:
        raise SpecError(f"{where}: source: a version made from another is {{type: version, version: \"1.0\"}}, not "
                        f"{source}")
    base = versions.get(str(source["version"]))
    if not isinstance(base, dict):
        raise SpecError(f"{where}: source: version {source['version']!r} is not one of {sorted(versions)}")
    if (base.get("source") or {}).get("type") == "version":
        raise SpecError(f"{where}: source: version {source['version']} is itself made from another version; name "
                        "the fp32 version")
    if not isinstance(settings, dict) or set(settings) - QUANTIZE_KEYS:
        raise SpecError(f"{where}: quantize: expected a mapping of {sorted(QUANTIZE_KEYS)}, not {settings!r}")
    mode = settings.get("mode")
    calibration = settings.get("calibration")
    if mode is not None and mode not in QUANTIZE_MODES:
        raise SpecError(f"{where}: quantize: mode {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
    gate = {key: settings.get(key, default) for key, default in {"max_drop": DEFAULT_MAX_DROP, **GATE_DEFAULTS}.items()}
    for key, value in gate.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise SpecError(f"{where}: quantize: {key} {value!r} must be a number from 0 to 1")
    if calibration is not None and (not isinstance(calibration, str) or mode == "dynamic"):
        raise SpecError(f"{where}: quantize: calibration must be a folder or file of inputs, for mode static only")
    if entry.get("runtime", "onnxruntime") != "onnxruntime":
        raise SpecError(f"{where}: runtime: a quantized version is served on onnxruntime, not {entry['runtime']!r}")
    merged = {key: base[key] for key in INHERITED if key in base}
    merged.update({key: value for key, value in entry.items() if key != "model_config"},
                  source=dict(base.get("source") or {}), runtime="onnxruntime",
                  model_config=_merge_model_config(base.get("model_config") or {}, entry.get("model_config") or {}))
    return merged, {"version": str(source["version"]), "mode": mode, **{k: float(v) for k, v in gate.items()},
                    **({"calibration": calibration} if calibration else {})}


def check_server_settings(config: dict) -> None:
    """A version's model_config, refused (naming the key) where TorchServe would not serve what it says: a key it
    does not read, a number that is not whole or under its least, minWorkers above maxWorkers, or maxBatchDelay 0 with
    batches: TorchServe reads 0 as unset and waits its default 100 ms for every batch to fill (measured: a lone
    request answered in 116 ms instead of 17)."""
    unknown = sorted(set(config) - set(SERVER_NUMBERS) - SERVER_OTHERS)
    if unknown:
        raise SpecError(f"model_config: TorchServe does not read {unknown} (it would pass over them without a word); "
                        f"its keys: {', '.join(SERVER_NUMBERS)}, ...; the handler's settings go under "
                        "model_config.handler")
    for key, least in SERVER_NUMBERS.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise SpecError(f"model_config.{key}: {value!r} is not a whole number from {least}")
    if config.get("minWorkers", 0) > config.get("maxWorkers", config.get("minWorkers", 0)):
        raise SpecError(f"model_config.minWorkers: {config['minWorkers']} is above maxWorkers {config['maxWorkers']}")
    if config.get("batchSize", 1) > 1 and config.get("maxBatchDelay") == 0:
        raise SpecError(f"model_config.maxBatchDelay: 0 with batchSize {config['batchSize']}: TorchServe reads 0 as "
                        "unset and waits its default 100 ms for every batch to fill; give 1 (ms) or more")


def _merge_model_config(base: dict, override: dict) -> dict:
    """A version's model_config over the model's: top-level keys replace, handler settings merge key by key."""
    merged = {**base, **override}
    merged["handler"] = {**(base.get("handler") or {}), **(override.get("handler") or {})}
    return merged


def load_specs(directory: Path = SPECS_DIR) -> dict[str, ModelSpec]:
    """Every spec in the folder, by model name."""
    specs: dict[str, ModelSpec] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        spec = load_spec(path)
        if spec.name in specs:
            raise SpecError(f"{path}: model {spec.name} is also defined in {specs[spec.name].path}")
        specs[spec.name] = spec
    return specs
