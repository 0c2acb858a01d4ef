"""Model specs: one YAML file per model in this folder (see README, "Add your own model").

A spec names the model, its handler module (``handler``, a file in handlers/), its default version and its versions
(each with the ``source`` of its weights), its labels and other extra files, how to export it, the ``runtime`` that
serves it (``torchscript`` or ``onnxruntime``), and ``model_config``: the model-config.yaml that goes into the archive,
exactly as TorchServe reads it (minWorkers, batchSize, ... at the top, the handler's own settings under
``handler:``). A version may override ``runtime``, ``export`` and ``model_config`` keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPECS_DIR = Path(__file__).resolve().parent
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MODEL_KEYS = {"name", "description", "handler", "default_version", "versions", "labels", "extra_files", "export",
              "model_config", "runtime"}
VERSION_KEYS = {"source", "description", "export", "model_config", "runtime"}
RUNTIMES = ("torchscript", "onnxruntime")
EXPORT_DEFAULTS = {"method": "trace", "freeze": True}


class SpecError(ValueError):
    """A spec file that cannot be used, with the file and the problem in the message."""


@dataclass(frozen=True)
class VersionSpec:
    model: str
    version: str
    handler: str  # a module in handlers/
    source: dict[str, Any]
    description: str
    labels: str | None  # a JSON file: repo-relative path, or "package:<module>/<file>" inside an installed package
    extra_files: tuple[str, ...]  # repo-relative paths
    export: dict[str, Any]
    runtime: str  # torchscript | onnxruntime
    model_config: dict[str, Any]  # model-config.yaml as TorchServe reads it; handler settings under "handler"

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
    name = raw["name"]
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise SpecError(f"{path}: model name {name!r} must be letters, digits, '_' or '-'")
    if not (SPECS_DIR.parent / "handlers" / f"{raw['handler']}.py").is_file():
        raise SpecError(f"{path}: handler {raw['handler']!r} is not a module in handlers/")
    versions = {}
    for version, entry in (raw["versions"] or {}).items():
        if not isinstance(version, str) or not VERSION.match(version):
            raise SpecError(f"{path}: version {version!r} must be a quoted string of numbers and dots, like \"1.0\"")
        entry = entry or {}
        unknown = set(entry) - VERSION_KEYS
        if unknown:
            raise SpecError(f"{path}: version {version}: unknown keys {sorted(unknown)}; known: {sorted(VERSION_KEYS)}")
        if "source" not in entry or "type" not in (entry["source"] or {}):
            raise SpecError(f"{path}: version {version}: missing 'source: {{type: ...}}'")
        runtime = entry.get("runtime", raw.get("runtime", RUNTIMES[0]))
        if runtime not in RUNTIMES:
            raise SpecError(f"{path}: version {version}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        versions[version] = VersionSpec(
            model=name,
            version=version,
            handler=raw["handler"],
            source=dict(entry["source"]),
            description=entry.get("description", ""),
            labels=raw.get("labels"),
            extra_files=tuple(raw.get("extra_files") or ()),
            export={**EXPORT_DEFAULTS, **(raw.get("export") or {}), **(entry.get("export") or {})},
            runtime=runtime,
            model_config=_merge_model_config(raw.get("model_config") or {}, entry.get("model_config") or {}),
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
