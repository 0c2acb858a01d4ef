"""What one model's pods need, read from the built archives: versions, workers × threads, CPU, memory and the A/B split.

Everything a manifest says about a model comes from here, and from the archives themselves: each version's
``model-config.yaml`` is read from inside its ``.mar`` after its sha256 is checked against the manifest
(``Manifest.verify``), so a manifest describes exactly what TorchServe will load, not a spec edited since the build.

Sizing. TorchServe and torch see the node's cores, not the pod's CPU limit: a worker runs ``handler.threads``
intra-op threads, so a pod serving versions v needs Σ_v minWorkers_v × threads_v cores for its workers, plus one
for the frontend (netty), nginx and the health checker. Requests equal limits (Guaranteed QoS: with integer CPUs the
static CPU manager can pin them). Memory is an estimate from the build's measurements (docs/performance.md, "Footprint and start-up"): the
frontend's JVM (capped at -Xmx1g by config.properties) and nginx, then per worker its runtime's base plus its
weights; ``--memory`` overrides it.

The split. The weights in a generated route or canary equal the local split: the running front door's route for the
model when there is one (``serving.front_door.Proxy().routes()``, the table ``python -m manage routes`` prints, with the
TorchServe default it was set with), else the ``--split`` option (between two versions: the older is the one in
production, the newer the canary), else none.
"""

from __future__ import annotations

import math
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import yaml

from archives import load_specs
from archives.store import REPO, Manifest

FRONTEND_CPU = 1  # the frontend's netty threads, nginx and the health checker
FRONTEND_MEMORY_MI = 1536  # the JVM (heap capped at 1 GiB by vmargs) + nginx + the health checker
WORKER_MEMORY_MI = {"torchscript": 512, "onnxruntime": 256}  # a worker's runtime before its weights
WEIGHT_COPIES = {"torchscript": 1, "onnxruntime": 2}  # ONNX Runtime keeps pre-packed copies of the weights
MEMORY_STEP_MI = 256
TARGET_RPS = 20  # requests per second per pod the autoscalers aim at; measure yours (make load-test)
MAX_REPLICAS = 10
MIN_REPLICAS = 2  # two pods: a node drain or a rolling update never leaves the model without one


class DeployError(RuntimeError):
    """Something in the archives, specs or options that prevents rendering, in one line."""


def dns_name(model: str) -> str:
    """A model's name as Kubernetes object names want it (DNS-1035 label): efficientnet_lite0 → efficientnet-lite0."""
    return model.lower().replace("_", "-").replace(".", "-")


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def torchserve_version() -> str:
    return metadata.version("torchserve")


def default_image() -> str:
    """The serving image: the toolkit's version and the TorchServe it pins, both in the tag."""
    return f"torchserve-toolkit:{project_version()}-torchserve{torchserve_version()}"


def default_threads() -> int:
    from handlers.base import ModelHandler

    return int(ModelHandler.DEFAULTS["threads"])


@dataclass
class VersionPlan:
    version: str
    archive: str  # file name in the model store
    runtime: str
    size_bytes: int
    config: dict[str, Any]  # the archive's model-config.yaml
    unpacked_bytes: int = 0  # its files' sizes: what TorchServe extracts when it loads the archive itself

    @property
    def workers(self) -> int:
        return int(self.config.get("minWorkers", 1))

    @property
    def threads(self) -> int:
        return int((self.config.get("handler") or {}).get("threads", default_threads()))


@dataclass
class ModelPlan:
    model: str
    versions: list[VersionPlan]
    default: str  # the version /predictions/<model> gets without a split (and Knative's stable revision)
    split: dict[str, float] | None = None  # version → weight, as the local split gives it
    split_source: str | None = None  # "front door" or "option"
    memory_mi: int = 0
    target_rps: int = TARGET_RPS
    min_replicas: int = MIN_REPLICAS
    max_replicas: int = MAX_REPLICAS

    @property
    def name(self) -> str:
        return dns_name(self.model)

    @property
    def worker_threads(self) -> int:
        """Σ over the served versions of minWorkers × threads: the cores the workers use."""
        return sum(v.workers * v.threads for v in self.versions)

    @property
    def cpu(self) -> int:
        return self.worker_threads + FRONTEND_CPU

    @property
    def response_timeout(self) -> int:
        return max(int(v.config.get("responseTimeout", 120)) for v in self.versions)

    def canary(self) -> tuple[str, int] | None:
        """(new version, its whole percent) for Knative's canaryTrafficPercent, or None when the split has no new
        version beside the default. Knative splits between two revisions only, in whole percents."""
        shares = {v: w for v, w in (self.split or {}).items() if w > 0}
        others = [v for v in shares if v != self.default]
        if not others or self.default not in shares:
            return None
        if len(others) > 1:
            raise DeployError(f"{self.model}: Knative's canary holds two revisions, the split has "
                              f"{len(shares)} versions ({', '.join(shares)})")
        [new] = others
        percent = 100 * shares[new] / sum(shares.values())
        if abs(percent - round(percent)) > 1e-9:
            raise DeployError(f"{self.model}: canaryTrafficPercent is a whole percent; the split gives {new} "
                              f"{percent:.4g}% (choose whole percentages, e.g. SPLIT=\"{self.default}=90 {new}=10\")")
        return new, int(round(percent))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelPlan:
        return cls(**{**data, "versions": [VersionPlan(**v) for v in data["versions"]]})


def archive_config(manifest: Manifest, model: str,
                   version: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(manifest entry, model-config.yaml, the sum of its files' sizes) of a built version, its archive checked
    against its sha256 first."""
    try:
        archive, entry = manifest.verify(model, version)
    except ValueError as error:
        raise DeployError(str(error)) from None
    with zipfile.ZipFile(archive) as mar:
        unpacked = sum(info.file_size for info in mar.infolist())
        return entry, yaml.safe_load(mar.read("model-config.yaml")) or {}, unpacked


def estimate_memory_mi(versions: list[VersionPlan]) -> int:
    total = FRONTEND_MEMORY_MI
    for v in versions:
        weights = v.size_bytes * WEIGHT_COPIES.get(v.runtime, 1) / 2**20
        total += v.workers * (WORKER_MEMORY_MI.get(v.runtime, 512) + weights)
    return int(math.ceil(total / MEMORY_STEP_MI) * MEMORY_STEP_MI)


def running_route(model: str) -> dict[str, Any] | None:
    """The running front door's route for ``model`` ({"split", "default"}), or None when it is not running or the
    model is not routed."""
    from serving.front_door import Proxy

    try:
        return Proxy().routes().state(model)
    except (OSError, ValueError, KeyError):
        return None


def option_split(model: str, terms: str, built: list[str]) -> dict[str, float]:
    from serving.front_door import parse_split
    from serving.instance import ServeError

    try:
        split = parse_split([terms])
    except ServeError as error:
        raise DeployError(f"--split: {error}") from None
    unknown = sorted(set(split) - set(built))
    if unknown:
        raise DeployError(f"--split names {model} {', '.join(unknown)}, not built (built: {', '.join(built)})")
    return split


def plan_models(models: list[str] | None = None, split: str | None = None, memory_mi: int | None = None,
                target_rps: int = TARGET_RPS, min_replicas: int = MIN_REPLICAS, max_replicas: int = MAX_REPLICAS,
                manifest: Manifest | None = None, use_running: bool = True) -> list[ModelPlan]:
    """A plan for every built model (or only ``models``), versions in order."""
    manifest = manifest or Manifest()
    specs = load_specs()
    built = sorted(manifest.models)
    if not built:
        raise DeployError(f"no archives in {manifest.store}: build them first with make archive")
    chosen = models or built
    unknown = [m for m in chosen if m not in built]
    if unknown:
        raise DeployError(f"{', '.join(unknown)} not built (built: {', '.join(built)}); make archive MODEL=...")
    if split and len(chosen) != 1:
        raise DeployError("--split (SPLIT=) needs one model: --model (MODEL=)")
    plans = []
    for model in chosen:
        versions = []
        for version in sorted(manifest.models[model], key=lambda v: [int(p) for p in v.split(".")]):
            entry, config, unpacked = archive_config(manifest, model, version)
            versions.append(VersionPlan(version, entry["archive"], entry.get("runtime", "torchscript"),
                                        int(entry["size_bytes"]), config, unpacked))
        names = [v.version for v in versions]
        default = specs[model].default_version if model in specs else names[-1]
        if default not in names:
            raise DeployError(f"{model}'s default version {default} is not built; make archive MODEL={model}")
        plan = ModelPlan(model, versions, default, target_rps=target_rps, min_replicas=min_replicas,
                         max_replicas=max_replicas)
        route = running_route(model) if use_running else None
        if route is not None:
            plan.split, plan.default, plan.split_source = dict(route["split"]), route["default"], "front door"
        elif split:
            plan.split, plan.split_source = option_split(model, split, names), "option"
            shared = [v for v in names if plan.split.get(v, 0) > 0]
            if len(shared) == 2:  # releasing a version: the older one is in production, the newer the canary
                plan.default = shared[0]
        if plan.split and len(plan.split) == 1:  # all traffic to one version: that version is the default
            plan.default = next(iter(plan.split))
        plan.memory_mi = memory_mi or estimate_memory_mi(versions)
        plan.canary()  # refuse a split Knative cannot express before anything is written
        plans.append(plan)
    return plans
