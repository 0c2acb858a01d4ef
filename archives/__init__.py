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
                "transform"}
RUNTIMES = ("torchscript", "onnxruntime")
EXPORT_DEFAULTS = {"method": "trace", "freeze": True}


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
            model_config=_merge_model_config(raw.get("model_config") or {}, entry.get("model_config") or {}),
            eval=None if entry.get("eval") is None else str(entry["eval"]),
            min_accuracy=None if minimum is None else float(minimum),
            transform=None if transform is None else {k: str(v) for k, v in transform.items()},
            runtime_reason=None if entry.get("runtime_reason") is None else str(entry["runtime_reason"]),
        )
    if str(raw["default_version"]) not in versions:
        raise SpecError(f"{path}: default_version {raw['default_version']!r} is not one of {sorted(versions)}")
    return ModelSpec(name=name, path=path, handler=raw["handler"], default_version=str(raw["default_version"]),
                     description=raw.get("description", ""), versions=versions)


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
