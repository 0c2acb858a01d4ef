"""KServe: our own ServingRuntime, an InferenceService per model in Standard and Knative variants, and the storage
layout KServe mounts, built through the kserve SDK's models.

Imported only in ``python -m deploy``'s own process (it imports kserve; see ``deploy/__init__.py``).

Why our own runtime: KServe's built-in TorchServe runtime pins the TorchServe 0.9 image and its samples pass flags
0.9 does not know. ``ServingRuntime/torchserve-toolkit`` runs this toolkit's image (TorchServe as ``uv.lock`` pins
it, behind the front door), so KServe serves exactly what was built and tested here. ``autoSelect: false``: only an
InferenceService naming it runs on it.

The runtime holds what is common to both modes and that Knative accepts (one container port, named ``http1``;
readiness and liveness probes; no ``preStop``). Each InferenceService adds what depends on its model and mode:

* Standard (``serving.kserve.io/deploymentMode: Standard``, KServe's RawDeployment): a Deployment and an HPA on CPU
  (KServe's HPA takes ``cpu`` or ``memory`` only; requests = limits make CPU utilisation a faithful load signal), the
  ``preStop`` drain, a startup probe and a grace period longer than both; the A/B split is applied by the front door
  in each pod (``AB_SPLITS``), never ``canaryTrafficPercent``, which Standard mode silently ignores;
* Knative (``serving.kserve.io/deploymentMode: Knative``): scale to zero (``minReplicas: 0``) on requests per second,
  Knative's queue-proxy drains a revision; a split between the default and one new version becomes
  ``canaryTrafficPercent`` = the new version's weight: the new revision serves the new version as its default
  (``config/config-<version>.properties``), the previous revision keeps the default one.

Storage (``storage/``, upload it to the ``storageUri``): ``config/config.properties`` (this repository's, with the
model store at ``/mnt/models/model-store`` and a ``model_snapshot`` naming each version's archive, its workers,
batching and timeout, and the default version; with a ``model_snapshot`` TorchServe ignores ``load_models``),
``config/ab-splits.json``, and ``model-store/`` (the archives and their manifest, hard links of the built ones).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kserve.models as sdk
import kubernetes.client as k8s
from kserve.api_client import ApiClient

from archives.store import Manifest, store_of
from deploy import contract
from deploy.checks import AUTOSCALER_CLASS, DEPLOYMENT_MODE, KNATIVE, STANDARD
from deploy.kubernetes import labels
from deploy.plan import ModelPlan, torchserve_version
from serving.instance import REPO, read_properties

RUNTIME = "torchserve-toolkit"
MODEL_FORMAT = "pytorch"
PROTOCOLS = ["v1", "v2"]
CPU_TARGET = 70  # Standard: HPA target, % of the CPU request
DEFAULT_STORAGE = "pvc://torchserve-toolkit-models/{model}"
RUNTIME_RESOURCES = {"cpu": "2", "memory": "2Gi"}  # each InferenceService sets its own


def serialize(obj: Any) -> dict[str, Any]:
    """What the SDK model serialises to: the YAML written is exactly the SDK's output."""
    return ApiClient().sanitize_for_serialization(obj)


def _env(pairs: list[tuple[str, str]]) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name=name, value=value) for name, value in pairs]


def _probe(spec: contract.Probe) -> k8s.V1Probe:
    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=spec.path, port=contract.PORTS["http"]),
                       period_seconds=spec.period, failure_threshold=spec.failures, timeout_seconds=spec.timeout,
                       initial_delay_seconds=spec.delay)


def _resources(amounts: dict[str, str]) -> k8s.V1ResourceRequirements:
    return k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def serving_runtime(image: str, namespace: str, plans: list[ModelPlan]) -> sdk.V1alpha1ServingRuntime:
    """The runtime every model's InferenceService runs on: its /tmp holds what the largest model's archives extract
    to (KServe's mount is read-only and holds no unpacked copy)."""
    env = contract.base_env(contract.KSERVE_MODEL_STORE, contract.KSERVE_CONFIG)
    tmp_size = contract.tmp_size(contract.tmp_budget(dict(env), max(map(contract.extracted_bytes, plans),
                                                                    default=0)))
    liveness = contract.PROBES["livenessProbe"]
    # without a startup probe (Knative), liveness waits out the frontend's start
    liveness = contract.Probe(liveness.path, liveness.period, liveness.failures, liveness.timeout, delay=30)
    container = k8s.V1Container(
        name="kserve-container",
        image=image,
        command=list(contract.COMMAND),
        env=_env(env),
        ports=[k8s.V1ContainerPort(container_port=contract.PORTS["http"], name="http1", protocol="TCP")],
        resources=_resources(RUNTIME_RESOURCES),
        readiness_probe=_probe(contract.PROBES["readinessProbe"]),
        liveness_probe=_probe(liveness),
        security_context=k8s.V1SecurityContext(**_snake(contract.SECURITY_CONTEXT)),
        volume_mounts=[k8s.V1VolumeMount(name="tmp", mount_path=contract.TMP),
                       k8s.V1VolumeMount(name="client-keys", mount_path=contract.CLIENT_KEYS_DIR, read_only=True)],
    )
    return sdk.V1alpha1ServingRuntime(
        api_version="serving.kserve.io/v1alpha1",
        kind="ServingRuntime",
        metadata=k8s.V1ObjectMeta(name=RUNTIME, namespace=namespace, labels=labels(),
                                  annotations={"torchserve-toolkit/torchserve-version": torchserve_version()}),
        spec=sdk.V1alpha1ServingRuntimeSpec(
            annotations={"prometheus.kserve.io/port": str(contract.PORTS["metrics"]),
                         "prometheus.kserve.io/path": "/metrics"},
            supported_model_formats=[sdk.V1alpha1SupportedModelFormat(name=MODEL_FORMAT, auto_select=False)],
            protocol_versions=list(PROTOCOLS),
            containers=[container],
            volumes=[k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=tmp_size)),
                     k8s.V1Volume(name="client-keys", secret=k8s.V1SecretVolumeSource(
                         secret_name=contract.CLIENT_KEYS_SECRET, default_mode=0o440))],
        ),
    )


def _snake(mapping: dict[str, Any]) -> dict[str, Any]:
    """camelCase keys (a manifest's) as the SDK's keyword arguments, nested objects built as SDK models."""
    out = {}
    for key, value in mapping.items():
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        if key == "capabilities":
            value = k8s.V1Capabilities(**_snake(value))
        elif key == "seccompProfile":
            value = k8s.V1SeccompProfile(**_snake(value))
        out[name] = value
    return out


def config_file(version: str | None = None) -> str:
    name = "config.properties" if version is None else f"config-{version}.properties"
    return f"{contract.KSERVE_ROOT}/config/{name}"


def inference_service(plan: ModelPlan, mode: str, namespace: str, storage_uri: str) -> sdk.V1beta1InferenceService:
    canary = plan.canary() if mode == KNATIVE else None
    if mode == STANDARD:
        env = contract.model_env(plan, f"{contract.KSERVE_ROOT}/config/{contract.AB_SPLITS_FILE}")
    else:  # Knative splits between revisions; the new one serves the new version as its default
        env = contract.model_env(plan, None)
        if canary:
            env.append(("TS_CONFIG_FILE", config_file(canary[0])))
    model = sdk.V1beta1ModelSpec(
        model_format=sdk.V1beta1ModelFormat(name=MODEL_FORMAT),
        runtime=RUNTIME,
        protocol_version="v1",
        storage_uri=storage_uri.format(model=plan.model),
        env=_env(env),
        resources=_resources(contract.resources(plan)["limits"]),
    )
    annotations = {DEPLOYMENT_MODE: mode}
    predictor: dict[str, Any] = {"model": model, "max_replicas": plan.max_replicas, "timeout": plan.response_timeout}
    if mode == STANDARD:
        annotations[AUTOSCALER_CLASS] = "hpa"
        model.lifecycle = k8s.V1Lifecycle(pre_stop=k8s.V1LifecycleHandler(
            _exec=k8s.V1ExecAction(command=list(contract.PRE_STOP))))
        model.startup_probe = _probe(contract.PROBES["startupProbe"])
        predictor.update(min_replicas=plan.min_replicas, scale_metric="cpu", scale_target=CPU_TARGET,
                         termination_grace_period_seconds=contract.GRACE_SECONDS,
                         deployment_strategy=k8s.V1DeploymentStrategy(
                             type="RollingUpdate",
                             rolling_update=k8s.V1RollingUpdateDeployment(max_unavailable=0, max_surge=1)))
    else:
        predictor.update(min_replicas=0, scale_metric="rps", scale_target=plan.target_rps)
        if canary:
            predictor["canary_traffic_percent"] = canary[1]
    note = (f"canary {canary[0]} at {canary[1]}% beside {plan.default} (split from the {plan.split_source})"
            if canary else f"default {plan.default}")
    annotations["torchserve-toolkit/traffic"] = note
    return sdk.V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=k8s.V1ObjectMeta(name=plan.name, namespace=namespace, labels=labels(plan), annotations=annotations),
        spec=sdk.V1beta1InferenceServiceSpec(predictor=sdk.V1beta1PredictorSpec(**predictor)),
    )


# --- storage -------------------------------------------------------------------------------------------------------


def model_snapshot(plan: ModelPlan, default: str) -> dict[str, Any]:
    keys = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
    versions = {}
    for v in plan.versions:
        versions[v.version] = {"defaultVersion": v.version == default, "marName": v.archive,
                               **{key: v.config[key] for key in keys if key in v.config}}
    return {"name": "startup.cfg", "modelCount": 1, "models": {plan.model: versions}}


def properties(plan: ModelPlan, default: str) -> str:
    """This repository's config.properties as KServe's storage serves it."""
    values = dict(read_properties(REPO / "config.properties"))
    values["model_store"] = contract.KSERVE_MODEL_STORE
    values.pop("load_models", None)  # model_snapshot below decides what loads
    values["model_snapshot"] = json.dumps(model_snapshot(plan, default), separators=(",", ":"))
    header = (f"# Generated by make deploy (deploy/kserve.py) from config.properties for {plan.model}, default "
              f"version {default}.\n# KServe mounts this folder's parent at {contract.KSERVE_ROOT}; serve.sh reads "
              f"this file from TS_CONFIG_FILE.\n")
    return header + "".join(f"{key}={value}\n" for key, value in values.items())


def write_storage(plan: ModelPlan, folder: Path, manifest: Manifest | None = None) -> list[Path]:
    config = folder / "config"
    config.mkdir(parents=True)
    written = [config / "config.properties"]
    written[0].write_text(properties(plan, plan.default))
    canary = plan.canary()
    if canary:
        written.append(config / f"config-{canary[0]}.properties")
        written[-1].write_text(properties(plan, canary[0]))
    (config / contract.AB_SPLITS_FILE).write_text(contract.ab_splits(plan))
    store_of(folder / "model-store", [(plan.model, v.version) for v in plan.versions], manifest)
    return written


# --- the SDK's own models as a schema --------------------------------------------------------------------------------

KINDS = {"InferenceService": sdk.V1beta1InferenceService, "ServingRuntime": sdk.V1alpha1ServingRuntime}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
K8S_API = re.compile(r"^K8sIoApi[A-Z][a-z]+(V\d+(?:(?:alpha|beta)\d+)?)(\w+)$")


def _resolve(name: str) -> type | None:
    for module in (sdk, k8s):
        if hasattr(module, name):
            return getattr(module, name)
    match = K8S_API.match(name)
    return getattr(k8s, match.group(1) + match.group(2), None) if match else None


def sdk_problems(obj: dict[str, Any]) -> list[str]:
    """Fields of a KServe manifest that the kserve SDK's models (and the Kubernetes models they hold) do not know,
    or hold a value of the wrong type: what the SDK would not have produced."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return [f"{kind}: not a KServe kind the SDK models ({', '.join(KINDS)})"]
    problems: list[str] = []
    _walk(obj, KINDS[kind], kind, problems)
    return problems


def _walk(value: Any, kind: Any, path: str, problems: list[str]) -> None:
    if isinstance(kind, str):
        inner = re.match(r"^(?:list|List)\[(.*)\]$", kind)
        if inner:
            if not isinstance(value, list):
                problems.append(f"{path}: expected a list")
                return
            for i, item in enumerate(value):
                _walk(item, inner.group(1), f"{path}[{i}]", problems)
            return
        inner = re.match(r"^(?:dict\(str, (.*)\)|Dict\[str, (.*)\])$", kind)
        if inner:
            if not isinstance(value, dict):
                problems.append(f"{path}: expected a mapping")
                return
            for key, item in value.items():
                _walk(item, inner.group(1) or inner.group(2), f"{path}.{key}", problems)
            return
        if kind in PRIMITIVES:
            if kind == "int" and isinstance(value, bool) or not isinstance(value, PRIMITIVES[kind]):
                problems.append(f"{path}: {value!r} is not {kind}")
            return
        resolved = _resolve(kind)
        if resolved is None:
            problems.append(f"{path}: the SDK names type {kind}, which it does not define")
            return
        kind = resolved
    if not isinstance(value, dict):
        problems.append(f"{path}: expected an object ({kind.__name__})")
        return
    fields = {json_name: attr for attr, json_name in kind.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{path}.{key}: unknown field (the SDK's {kind.__name__} has no such field)")
            continue
        _walk(item, kind.openapi_types[fields[key]], f"{path}.{key}", problems)
