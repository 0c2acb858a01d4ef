"""Write the output folder: plain Kubernetes, KServe, the Dockerfile; every object one YAML file.

The folder is replaced as a whole, so it never mixes two renders. The KServe part imports kserve, so it is written
in ``python -m deploy``'s own process; ``render_all`` called from any other process (the rehearsal, the tests) runs
``python -m deploy kserve`` for it with the same plans (``deploy/__init__.py`` says why).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import deploy
from archives.store import REPO
from deploy import image as image_file
from deploy import kubernetes, monitoring
from deploy.plan import MAX_REPLICAS, MIN_REPLICAS, TARGET_RPS, DeployError, ModelPlan, default_image, plan_models

NAMESPACE = "torchserve"
GATEWAY_NAMESPACE = "ingress-nginx"
PROMETHEUS_NAMESPACE = "monitoring"


@dataclass
class Options:
    image: str = field(default_factory=default_image)
    namespace: str = NAMESPACE
    gateway_namespace: str = GATEWAY_NAMESPACE
    prometheus_namespace: str = PROMETHEUS_NAMESPACE
    storage_uri: str = ""  # KServe: where each model's storage/ folder is uploaded, "{model}" filled in

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def dump(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj, sort_keys=False, width=120))
    return path


def render_kubernetes(plans: list[ModelPlan], out: Path, options: Options) -> list[Path]:
    folder = out / "kubernetes"
    written = []
    for name, obj in kubernetes.shared_objects(options.namespace).items():
        written.append(dump(obj, folder / name))
    for plan in plans:
        objects = kubernetes.model_objects(plan, options.image, options.gateway_namespace,
                                           options.prometheus_namespace)
        for name, obj in objects.items():
            written.append(dump(obj, folder / plan.model / name))
    resources = [str(path.relative_to(folder)) for path in written]
    written.append(dump(kubernetes.kustomization(resources, options.namespace, options.image),
                        folder / "kustomization.yaml"))
    # not part of the kustomization: it configures prometheus-adapter, wherever that is installed
    written.append(dump(monitoring.adapter_rules(), out / "prometheus-adapter" / "rules.yaml"))
    return written


def render_image(out: Path, options: Options) -> list[Path]:
    dockerfile = out / "Dockerfile"
    dockerfile.write_text(image_file.dockerfile(options.image))
    ignore = out / "Dockerfile.dockerignore"
    ignore.write_text(image_file.dockerignore())
    return [dockerfile, ignore]


def render_kserve(plans: list[ModelPlan], out: Path, options: Options) -> list[Path]:
    """In this process: only where importing kserve is safe (``python -m deploy``)."""
    from deploy import kserve

    folder = out / "kserve"
    storage = options.storage_uri or kserve.DEFAULT_STORAGE
    written = [dump(kserve.serialize(kserve.serving_runtime(options.image, options.namespace, plans)),
                    folder / "servingruntime.yaml")]
    for plan in plans:
        for mode in (kserve.STANDARD, kserve.KNATIVE):
            isvc = kserve.inference_service(plan, mode, options.namespace, storage)
            written.append(dump(kserve.serialize(isvc),
                                folder / plan.model / f"inferenceservice-{mode.lower()}.yaml"))
        written += kserve.write_storage(plan, folder / plan.model / "storage")
    return written


def render_kserve_elsewhere(out: Path) -> None:
    """``render_kserve`` in a process of its own, with the plans and options recorded in ``out`` (``plans.json``)."""
    result = subprocess.run([sys.executable, "-m", "deploy", "kserve", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise DeployError(f"rendering KServe failed: {result.stderr.strip()[-2000:]}")


def render_plans(plans: list[ModelPlan], out: Path, options: Options) -> Path:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    render_kubernetes(plans, out, options)
    render_image(out, options)
    (out / "plans.json").write_text(json.dumps({"plans": [p.to_json() for p in plans],
                                                "options": options.to_json()}, indent=2) + "\n")
    if deploy.OWN_PROCESS:
        render_kserve(plans, out, options)
    else:
        render_kserve_elsewhere(out)
    return out


def render_all(out: Path = deploy.OUT, models: list[str] | None = None, split: str | None = None,
               memory_mi: int | None = None, target_rps: int = TARGET_RPS, min_replicas: int = MIN_REPLICAS,
               max_replicas: int = MAX_REPLICAS, use_running: bool = True, options: Options | None = None) -> Path:
    """Render every built model (or ``models``) into ``out``; the folder."""
    plans = plan_models(models, split=split, memory_mi=memory_mi, target_rps=target_rps, min_replicas=min_replicas,
                        max_replicas=max_replicas, use_running=use_running)
    return render_plans(plans, out, options or Options())


def load_plans(out: Path) -> tuple[list[ModelPlan], Options]:
    """The plans and options a folder was rendered with (``plans.json``)."""
    data = json.loads((Path(out) / "plans.json").read_text())
    return [ModelPlan.from_json(p) for p in data["plans"]], Options(**data["options"])
