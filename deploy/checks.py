"""The offline proofs of ``make deploy``'s folder: each function returns the problems it finds (empty: it passed).

No cluster, no Docker daemon, no network. What each proves:

* ``kubernetes_validate``: every core object (Deployment, Service, HPA, PDB, NetworkPolicy, ConfigMap, Namespace,
  ServiceAccount) against Kubernetes' own OpenAPI schemas, ``--strict`` (an unknown field fails), for every version
  in ``deploy.KUBERNETES_VERSIONS``; a WARN (no schema for a kind) is a failure, so CRD kinds never go there;
* ``deployment_problems``, ``autoscaling_problems``, ``network_policy_problems``: what the schemas cannot know:
  requests = limits, workers × threads (read from the archives) within the CPU limit, the thread variables, probes on
  the health endpoints and never on ``/ping``, the ``preStop`` drain inside the grace period, a non-root read-only
  container, a rollout that keeps capacity, an HPA on a rate, management reachable from nowhere;
* ``kserve_problems``: KServe's admission rules (its validating webhook, restated): the name a DNS-1035 label of at
  most 45 characters (room for Knative's ``-predictor-00001`` within 63), ``deploymentMode`` set and known,
  ``canaryTrafficPercent`` only in Knative mode and 0..100, ``minReplicas`` ≤ ``maxReplicas``, the scale metric one
  the mode's autoscaler takes (HPA: cpu, memory; Knative's KPA: concurrency, rps), one implementation, the runtime
  present, pinned to our TorchServe, and Knative-compatible; the kserve SDK's own models check every field
  (``deploy.kserve.sdk_problems``, run by ``python -m deploy check`` in its own process);
* ``promtool_problems``: ``promtool check rules`` on each PrometheusRule's groups, and ``promtool test rules`` with a
  unit test per alert (it fires where it should, after its ``for``, and stays silent where it should not);
* ``kustomize_problems``: ``kubectl kustomize`` renders the folder, every object in the namespace, kinds as written;
* ``dockerfile_problems``: hadolint (every finding fails) and the contract: pinned base and packages, a last ``USER``
  that is not root, the entry point and command, one COPY per entry of the image's list.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

import deploy
from deploy import contract, image, monitoring
from deploy.plan import plan_models, torchserve_version

CORE_KINDS = {"Namespace", "ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler",
              "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
PINNED_TORCHSERVE = "0.12"

# KServe's vocabulary and admission rules (pkg/apis/serving/v1beta1/inference_service_validation.go, restated)
STANDARD, KNATIVE = "Standard", "Knative"
DEPLOYMENT_MODES = {STANDARD, KNATIVE}  # RawDeployment and Serverless are their deprecated names
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
AUTOSCALER_CLASSES = {"hpa", "external", "none", "keda"}
HPA_METRICS = {"cpu", "memory"}
KPA_METRICS = {"concurrency", "rps"}
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ISVC_NAME_MAX = 45
IMPLEMENTATIONS = {"model", "pytorch", "sklearn", "xgboost", "tensorflow", "triton", "onnx", "huggingface", "pmml",
                   "lightgbm", "paddle", "containers"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
KNATIVE_PORT_NAMES = {"http1", "h2c"}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def objects(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(Path(folder).rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "storage" in path.parts:
            continue
        found += [(path, doc) for doc in load(path) if "kind" in doc]
    return found


def quantity(text: str | int | float) -> float:
    """A Kubernetes CPU quantity in cores: "2" → 2, "1500m" → 1.5."""
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


BYTE_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
BYTE_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def byte_quantity(text: str | int) -> int | None:
    """A Kubernetes storage quantity in bytes: "576Mi" → 603979776, "1G" → 10**9, "512" → 512; None if it is not
    one."""
    match = BYTE_QUANTITY.match(str(text))
    return int(float(match.group(1)) * BYTE_SUFFIXES.get(match.group(2) or "", 1)) if match else None


def tmp_problems(name: str, pod: dict[str, Any], container: dict[str, Any], extracted: int = 0) -> list[str]:
    """/tmp is an emptyDir holding LOG_DIR and SERVE_HOME, and its sizeLimit covers what the pod may write there
    (``contract.tmp_budget`` with the container's own environment, ``extracted`` bytes of archives)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == contract.TMP]
    volume = volumes.get(mounts[0]["name"], {}) if mounts else {}
    if "emptyDir" not in volume:
        return [f"{name}: {contract.TMP} must be an emptyDir (the root filesystem is read-only)"]
    problems = []
    env = _env(container)
    for variable in ("LOG_DIR", "SERVE_HOME"):
        if not env.get(variable, "").startswith(f"{contract.TMP}/"):
            problems.append(f"{name}: {variable} must lie under {contract.TMP} (the budgeted emptyDir)")
    budget = sum(contract.tmp_budget(env, extracted).values())
    limit = (volume["emptyDir"] or {}).get("sizeLimit")
    limit_bytes = None if limit is None else byte_quantity(limit)
    if limit_bytes is None or limit_bytes < budget:
        problems.append(f"{name}: {contract.TMP}'s sizeLimit {limit} is under what the pod may write there, "
                        f"{budget / 2**20:.0f} MiB (every log at its cap, SERVE_HOME's state"
                        + (", the extracted archives)" if extracted else ")"))
    return problems


# --- kubernetes-validate -------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A tool from this environment's bin (kubernetes-validate, hadolint), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (make install)")
    return found


def kubernetes_validate(files: list[Path], versions: tuple[str, ...] = deploy.KUBERNETES_VERSIONS) -> list[str]:
    """kubernetes-validate --strict on all ``files`` at once, per Kubernetes version; any ERROR, WARN or FATAL line
    (or a failing exit status) is a problem."""
    problems = []
    for version in versions:
        result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version,
                                 *map(str, files)], capture_output=True, text=True, timeout=300, check=False)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        bad = [line for line in lines if line.split(" ", 1)[0] in ("ERROR", "WARN", "FATAL")]
        problems += [f"kubernetes {version}: {line}" for line in bad]
        if result.returncode != 0 and not bad:
            problems.append(f"kubernetes {version}: kubernetes-validate exited {result.returncode}: {lines[-3:]}")
    return problems


# --- what the schemas cannot know ----------------------------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


def deployment_problems(dep: dict[str, Any], worker_threads: int | None = None) -> list[str]:
    """The Deployment's contract; ``worker_threads``: Σ minWorkers × threads of what its pods serve (None: derived
    from the archives named by SERVE_MODELS)."""
    name = dep.get("metadata", {}).get("name", "?")
    problems = []
    pod = dep["spec"]["template"]["spec"]
    containers = pod.get("containers", [])
    if len(containers) != 1:
        return [f"{name}: one container expected, found {len(containers)}"]
    [c] = containers
    env = _env(c)
    resources = c.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if not {"cpu", "memory"} <= set(limits):
        problems.append(f"{name}: cpu and memory limits are required")
    if requests != limits:
        problems.append(f"{name}: requests {requests} != limits {limits} (Guaranteed QoS needs them equal)")
    if worker_threads is None:
        served = [m for m in env.get("SERVE_MODELS", "").split(",") if m]
        worker_threads = sum(p.worker_threads for p in plan_models(served, use_running=False)) if served else 0
    cpu = quantity(limits.get("cpu", 0))
    if cpu < worker_threads:
        problems.append(f"{name}: CPU limit {cpu:g} < workers × threads {worker_threads} (torch and TorchServe see "
                        "the node's cores, not the limit)")
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if env.get(variable) != "1":
            problems.append(f"{name}: {variable} must be 1 (the handlers set their own threads)")
    for variable in ("TS_NUMBER_OF_NETTY_THREADS", "TS_NETTY_CLIENT_THREADS"):
        value = env.get(variable, "")
        if not value.isdigit() or not 1 <= int(value) <= max(cpu, 1):
            problems.append(f"{name}: {variable}={value!r} must be set, 1 .. the CPU limit ({cpu:g})")
    if c.get("command", []) + c.get("args", []) != contract.COMMAND:
        problems.append(f"{name}: command must be {contract.COMMAND}")
    expected = {"startupProbe": {"/health/live"}, "readinessProbe": {"/health/ready"},
                "livenessProbe": {"/health/live"}}
    for kind, paths in expected.items():
        probe = c.get(kind)
        get = (probe or {}).get("httpGet", {})
        if not probe:
            problems.append(f"{name}: no {kind}")
        elif get.get("path") not in paths:
            problems.append(f"{name}: {kind} must call {' or '.join(sorted(paths))} (no key needed), not "
                            f"{get.get('path')!r}" + (" (/ping needs the inference key)" if "ping" in
                                                       str(get.get("path")) else ""))
        elif get.get("port") not in ("http", contract.PORTS["http"]):
            problems.append(f"{name}: {kind} must use the front door's port {contract.PORTS['http']}")
    startup = c.get("startupProbe") or {}
    if startup and startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10) < 120:
        problems.append(f"{name}: the startup probe allows under 120 s for the workers to load")
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if pre_stop != contract.PRE_STOP:
        problems.append(f"{name}: preStop must run {contract.PRE_STOP} (TorchServe does not drain on stop)")
    drain = int(env.get("DRAIN_SECONDS", "0") or 0)
    if drain <= 0:
        problems.append(f"{name}: DRAIN_SECONDS must be set")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= drain + contract.STOP_BUDGET_SECONDS:
        problems.append(f"{name}: terminationGracePeriodSeconds {grace} must exceed DRAIN_SECONDS {drain} + the stop "
                        f"budget {contract.STOP_BUDGET_SECONDS}")
    security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    if security.get("runAsNonRoot") is not True or security.get("runAsUser") == 0:
        problems.append(f"{name}: must run as non-root (runAsNonRoot: true)")
    if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem must be true")
    problems += tmp_problems(name, pod, c)  # the image's archives are unpacked: TorchServe extracts nothing
    strategy = dep["spec"].get("strategy", {})
    rolling = strategy.get("rollingUpdate", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate" or \
            (rolling.get("maxUnavailable"), rolling.get("maxSurge")) not in ((0, 1), (1, 0)):
        problems.append(f"{name}: RollingUpdate with maxUnavailable 0 / maxSurge 1 (or 1/0) expected, got {strategy}")
    return problems


def autoscaling_problems(hpa: dict[str, Any], pdb: dict[str, Any] | None = None) -> list[str]:
    name = hpa.get("metadata", {}).get("name", "?")
    spec = hpa["spec"]
    problems = []
    if hpa.get("apiVersion") != "autoscaling/v2":
        problems.append(f"{name}: HorizontalPodAutoscaler must be autoscaling/v2")
    low, high = spec.get("minReplicas", 1), spec.get("maxReplicas", 0)
    if not 1 <= low <= high:
        problems.append(f"{name}: 1 <= minReplicas {low} <= maxReplicas {high} expected")
    for metric in spec.get("metrics", []):
        kind = metric.get("type")
        source = metric.get(kind[:1].lower() + kind[1:] if kind else "", {})
        metric_name = source.get("metric", {}).get("name", "")
        if kind in ("Pods", "Object", "External") and metric_name.endswith("_total"):
            problems.append(f"{name}: {metric_name} is a cumulative counter; scale on its rate")
    if not spec.get("metrics"):
        problems.append(f"{name}: no metrics")
    if pdb is not None:
        budget = pdb["spec"]
        if "minAvailable" in budget and int(budget["minAvailable"]) >= low:
            problems.append(f"{name}: PodDisruptionBudget minAvailable {budget['minAvailable']} blocks every drain "
                            f"at minReplicas {low}")
        if budget.get("maxUnavailable") == 0:
            problems.append(f"{name}: PodDisruptionBudget maxUnavailable 0 blocks every drain")
    return problems


def network_policy_problems(policy: dict[str, Any]) -> list[str]:
    name = policy.get("metadata", {}).get("name", "?")
    spec = policy["spec"]
    problems = []
    if "Ingress" not in spec.get("policyTypes", []):
        problems.append(f"{name}: the policy must restrict Ingress")
    allowed = {"http": contract.PORTS["http"], "grpc": contract.PORTS["grpc"], "metrics": contract.PORTS["metrics"]}
    for rule in spec.get("ingress", []):
        sources = rule.get("from")
        ports = {p.get("port") for p in rule.get("ports", [])}
        if not sources or any(not s for s in sources):
            problems.append(f"{name}: an ingress rule open to everyone")
        if not ports:
            problems.append(f"{name}: an ingress rule open on every port (management included)")
        if ports - set(allowed.values()) - set(allowed):
            problems.append(f"{name}: ports {sorted(map(str, ports))} opened beyond inference and metrics")
        if contract.PORTS["metrics"] in ports and any("podSelector" not in s for s in sources or []):
            problems.append(f"{name}: metrics open to more than Prometheus' pods")
    return problems


def monitor_problems(monitor: dict[str, Any]) -> list[str]:
    name = monitor.get("metadata", {}).get("name", "?")
    paths = {(e.get("port"), e.get("path")) for e in monitor.get("spec", {}).get("endpoints", [])}
    missing = {("metrics", "/metrics"), ("metrics", "/metrics/front_door")} - paths
    problems = [f"{name}: ServiceMonitor does not scrape {port} {path}" for port, path in sorted(missing)]
    if monitor.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"{name}: ServiceMonitor must be monitoring.coreos.com/v1")
    return problems


def kubernetes_problems(folder: Path) -> dict[str, list[str]]:
    """The contract checks on every object of the plain Kubernetes folder, by object."""
    found = objects(folder)
    by_kind: dict[str, dict[str, dict]] = {}
    for _, obj in found:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    problems: dict[str, list[str]] = {}
    for name, dep in by_kind.get("Deployment", {}).items():
        problems[f"Deployment/{name}"] = deployment_problems(dep)
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        problems[f"HorizontalPodAutoscaler/{name}"] = autoscaling_problems(
            hpa, by_kind.get("PodDisruptionBudget", {}).get(name))
        if name not in by_kind.get("Deployment", {}):
            problems[f"HorizontalPodAutoscaler/{name}"].append(f"{name}: scales a Deployment that is not there")
    for name, policy in by_kind.get("NetworkPolicy", {}).items():
        problems[f"NetworkPolicy/{name}"] = network_policy_problems(policy)
    for name, monitor in by_kind.get("ServiceMonitor", {}).items():
        problems[f"ServiceMonitor/{name}"] = monitor_problems(monitor)
    unknown = {kind for _, obj in found for kind in [obj["kind"]]} - CORE_KINDS - CRD_KINDS
    if unknown:
        problems["kinds"] = [f"unexpected kinds {sorted(unknown)}"]
    return problems


# --- KServe ----------------------------------------------------------------------------------------------------------


def runtime_problems(runtime: dict[str, Any], extracted: int = 0) -> list[str]:
    """``extracted``: the bytes the largest model's archives extract to (KServe's mount holds no unpacked copy)."""
    name = runtime.get("metadata", {}).get("name", "?")
    spec = runtime.get("spec", {})
    problems = []
    if runtime.get("apiVersion") != "serving.kserve.io/v1alpha1" or runtime.get("kind") != "ServingRuntime":
        problems.append(f"{name}: must be a serving.kserve.io/v1alpha1 ServingRuntime (namespaced)")
    if not ISVC_NAME.match(name):
        problems.append(f"{name}: not a DNS-1035 label")
    containers = spec.get("containers", [])
    if len(containers) != 1:
        problems.append(f"{name}: one container expected")
    for c in containers:
        tag = c.get("image", "").rpartition(":")[2]
        pinned = re.search(r"torchserve(\d+\.\d+)", tag)
        if not pinned or pinned.group(1) != PINNED_TORCHSERVE or \
                not torchserve_version().startswith(PINNED_TORCHSERVE):
            problems.append(f"{name}: image {c.get('image')!r} must pin TorchServe {PINNED_TORCHSERVE} in its tag")
        ports = c.get("ports", [])
        if len(ports) != 1 or ports[0].get("name") not in KNATIVE_PORT_NAMES:
            problems.append(f"{name}: Knative takes one container port named http1 or h2c, got {ports}")
        if "lifecycle" in c:
            problems.append(f"{name}: Knative refuses lifecycle hooks in a runtime (the Standard service adds it)")
        if c.get("command", []) + c.get("args", []) != contract.COMMAND:
            problems.append(f"{name}: command must be {contract.COMMAND}")
        resources = c.get("resources", {})
        if resources.get("requests") != resources.get("limits"):
            problems.append(f"{name}: requests != limits")
        for kind in ("readinessProbe", "livenessProbe"):
            if (c.get(kind) or {}).get("httpGet", {}).get("path") not in ("/health/live", "/health/ready"):
                problems.append(f"{name}: {kind} must call the front door's /health/* (not /ping)")
        problems += tmp_problems(name, spec, c, extracted)
    formats = spec.get("supportedModelFormats", [])
    if not formats or any(f.get("autoSelect") is not False for f in formats):
        problems.append(f"{name}: supportedModelFormats with autoSelect: false expected")
    if not spec.get("protocolVersions") or set(spec["protocolVersions"]) - PROTOCOLS:
        problems.append(f"{name}: protocolVersions must be within {sorted(PROTOCOLS)}")
    annotations = spec.get("annotations", {})
    if annotations.get("prometheus.kserve.io/port") != str(contract.PORTS["metrics"]) or \
            not annotations.get("prometheus.kserve.io/path"):
        problems.append(f"{name}: prometheus.kserve.io/port and /path annotations expected")
    return problems


def isvc_problems(isvc: dict[str, Any], runtimes: dict[str, dict[str, Any]]) -> list[str]:
    meta = isvc.get("metadata", {})
    name = meta.get("name", "")
    annotations = meta.get("annotations") or {}
    problems = []
    if not ISVC_NAME.match(name) or len(name) > ISVC_NAME_MAX:
        problems.append(f"{name!r}: an InferenceService name is a DNS-1035 label [a-z]([-a-z0-9]*[a-z0-9])? of at "
                        f"most {ISVC_NAME_MAX} characters")
    mode = annotations.get(DEPLOYMENT_MODE)
    if mode not in DEPLOYMENT_MODES:
        problems.append(f"{name}: {DEPLOYMENT_MODE} must be set to one of {sorted(DEPLOYMENT_MODES)}, got {mode!r}")
    autoscaler = annotations.get(AUTOSCALER_CLASS, "hpa")
    if autoscaler not in AUTOSCALER_CLASSES:
        problems.append(f"{name}: [{autoscaler}] is not a supported autoscaler class")
    predictor = isvc.get("spec", {}).get("predictor", {})
    canary = predictor.get("canaryTrafficPercent")
    if canary is not None:
        if mode != KNATIVE:
            problems.append(f"{name}: canaryTrafficPercent works only in Knative mode ({mode} ignores it silently)")
        if not isinstance(canary, int) or isinstance(canary, bool) or not 0 <= canary <= 100:
            problems.append(f"{name}: canaryTrafficPercent {canary!r} must be a whole number from 0 to 100")
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    if low < 0:
        problems.append(f"{name}: minReplicas {low} < 0")
    if high and high < low:
        problems.append(f"{name}: minReplicas {low} > maxReplicas {high}")
    metric, target = predictor.get("scaleMetric"), predictor.get("scaleTarget")
    if mode == STANDARD:
        if low < 1:
            problems.append(f"{name}: Standard mode cannot scale to zero (minReplicas {low})")
        if autoscaler == "hpa":
            metric = metric or "cpu"
            if metric not in HPA_METRICS:
                problems.append(f"{name}: [{metric}] is not a supported metric for the HPA (cpu, memory)")
            elif target is not None and metric == "cpu" and not 1 <= target <= 100:
                problems.append(f"{name}: the target utilization percentage should be a [1-100] integer")
    elif mode == KNATIVE:
        metric = metric or "concurrency"
        if metric not in KPA_METRICS:
            problems.append(f"{name}: [{metric}] is not a supported metric for Knative's autoscaler (concurrency, rps)")
        if metric == "rps" and target is not None and target < 1:
            problems.append(f"{name}: the target for rps should be at least 1")
        if "deploymentStrategy" in predictor:
            problems.append(f"{name}: customizing deploymentStrategy is only supported in Standard mode")
    implementations = sorted(set(predictor) & IMPLEMENTATIONS)
    if len(implementations) != 1:
        problems.append(f"{name}: exactly one predictor implementation expected, got {implementations}")
    model = predictor.get("model") or {}
    if model.get("name"):
        problems.append(f"{name}: the 'name' field is not allowed in a standard predictor")
    runtime = runtimes.get(model.get("runtime", ""))
    if runtime is None:
        problems.append(f"{name}: runtime {model.get('runtime')!r} is not among the generated ServingRuntimes")
    else:
        formats = {f.get("name") for f in runtime["spec"].get("supportedModelFormats", [])}
        if (model.get("modelFormat") or {}).get("name") not in formats:
            problems.append(f"{name}: modelFormat is not one {model.get('runtime')} supports ({sorted(formats)})")
        if model.get("protocolVersion", "v1") not in runtime["spec"].get("protocolVersions", []):
            problems.append(f"{name}: protocolVersion {model.get('protocolVersion')} is not the runtime's")
    if not model.get("storageUri"):
        problems.append(f"{name}: no storageUri")
    resources = model.get("resources", {})
    if resources.get("requests") != resources.get("limits"):
        problems.append(f"{name}: requests != limits")
    return problems


def kserve_problems(folder: Path, plans: list) -> dict[str, list[str]]:
    """``plans``: those the folder was rendered with (``render.load_plans``)."""
    found = objects(folder)
    extracted = max(map(contract.extracted_bytes, plans), default=0)
    runtimes = {o["metadata"]["name"]: o for _, o in found if o["kind"] == "ServingRuntime"}
    problems = {f"ServingRuntime/{name}": runtime_problems(o, extracted) for name, o in runtimes.items()}
    if not runtimes:
        problems["ServingRuntime"] = ["no ServingRuntime"]
    for path, obj in found:
        if obj["kind"] == "InferenceService":
            problems[f"InferenceService/{path.parent.name}/{path.stem}"] = isvc_problems(obj, runtimes)
    return problems


# --- promtool ------------------------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> tuple[int, str]:
    result = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                            check=False)
    return result.returncode, (result.stdout + result.stderr).strip()


def promtool_problems(folder: Path, plans: list) -> tuple[list[str], list[str]]:
    """(problems, promtool's lines) for every PrometheusRule under ``folder``: check rules, then a unit test per
    alert. ``plans``: those the folder was rendered with (``render.load_plans``)."""
    plans = {p.model: p for p in plans}
    problems, lines = [], []
    for path, rule in objects(folder):
        if rule["kind"] != "PrometheusRule":
            continue
        model = path.parent.name
        with tempfile.TemporaryDirectory() as work:
            work_dir = Path(work)
            groups = rule["spec"]["groups"]
            (work_dir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
            code, output = promtool("check", "rules", "rules.yaml", cwd=work_dir)
            lines.append(f"{model}: promtool check rules: {output.splitlines()[-1] if output else code}")
            if code != 0:
                problems.append(f"{model}: promtool check rules failed: {output}")
                continue
            plan = plans.get(model)
            if plan is None:
                problems.append(f"{model}: no plan recorded for its unit tests")
                continue
            for alert, test in monitoring.unit_tests(plan, groups, "rules.yaml").items():
                test_file = work_dir / f"{alert}.test.yaml"
                test_file.write_text(yaml.safe_dump(test, sort_keys=False))
                code, output = promtool("test", "rules", test_file.name, cwd=work_dir)
                lines.append(f"{model}: promtool test rules {alert}: {'SUCCESS' if code == 0 else 'FAILED'}")
                if code != 0:
                    problems.append(f"{model}: promtool test rules {alert}: {output}")
    if not lines:
        problems.append("no PrometheusRule found")
    return problems, lines


def adapter_problems(rules_file: Path) -> list[str]:
    """prometheus-adapter's rule, as the adapter would run it for one pod: its ``metricsQuery`` with the adapter's
    template filled in, unit-tested by promtool on what the health checker exports for a pod that answers 3
    predictions a second with a key, 10 a second of a stranger's 401s and 5 probes a second: it must read 3."""
    [rule] = load(rules_file)[0]["rules"]
    series = re.sub(r"\{.*", "", rule["seriesQuery"])
    query = (rule["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", 'namespace="ns",pod="p"').replace("<<.GroupBy>>", "pod"))
    pod = 'namespace="ns",pod="p",model="digits",retried="false"'
    answered, forwarded = "frontdoor_requests_total", monitoring.RPS_SOURCE
    exported = [  # (metric, labels, per minute): every request is answered; those passed on are forwarded too
        (answered, 'api="predictions",version="2.0",status="200"', 180),
        (forwarded, 'api="predictions",version="2.0",status="200"', 180),
        (answered, 'api="predictions",version="",status="401"', 600),  # refused by the door: never forwarded
        (answered, 'api="health",version="",status="200"', 300),
        (forwarded, 'api="health",version="",status="200"', 300),
    ]
    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f"{metric}{{{pod},{labels}}}", "values": f"0+{per_minute}x10"}
                         for metric, labels, per_minute in exported],
        "promql_expr_test": [{"expr": query, "eval_time": "10m", "exp_samples": [{"labels": '{pod="p"}',
                                                                                 "value": 3}]}],
    }]}
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "adapter.test.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
        code, output = promtool("test", "rules", "adapter.test.yaml", cwd=Path(work))
    return [] if code == 0 else [f"{rules_file.name}: the adapter's query, filled in as the adapter does: {output}"]


# --- kustomize -----------------------------------------------------------------------------------------------------


def kustomize_problems(folder: Path, namespace: str | None = None) -> list[str]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return ["kubectl is not installed (./install.sh installs Debian's kubernetes-client)"]
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120,
                            check=False)
    if result.returncode != 0:
        return [f"kubectl kustomize failed: {result.stderr.strip()}"]
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    written = [obj for _, obj in objects(folder)]
    problems = []
    if Counter(o["kind"] for o in rendered) != Counter(o["kind"] for o in written):
        problems.append(f"kustomize rendered {dict(Counter(o['kind'] for o in rendered))}, the folder holds "
                        f"{dict(Counter(o['kind'] for o in written))}")
    namespace = namespace or load(folder / "kustomization.yaml")[0]["namespace"]
    stray = [f"{o['kind']}/{o['metadata']['name']}" for o in rendered
             if o["kind"] != "Namespace" and o["metadata"].get("namespace") != namespace]
    if stray:
        problems.append(f"outside namespace {namespace}: {stray}")
    return problems


# --- the Dockerfile --------------------------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "hadolint.yaml"
        config.write_text("failure-threshold: style\n")  # every finding fails; no local configuration applies
        result = subprocess.run([tool("hadolint"), "--config", str(config), "--no-color", str(dockerfile)],
                                capture_output=True, text=True, timeout=120, check=False)
    output = (result.stdout + result.stderr).strip()
    return [f"hadolint: {line}" for line in output.splitlines()] if result.returncode != 0 or output else []


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerfile_rules(text: str) -> list[str]:
    problems = []
    steps = _instructions(text)
    for keyword, rest in steps:
        if keyword == "FROM":
            reference = rest.split()[0]
            tag = reference.rpartition(":")[2] if ":" in reference.split("/")[-1] else ""
            if "@sha256:" not in reference and not re.match(r"^\d+\.\d+\.\d+", tag):
                problems.append(f"FROM {reference}: pin the base image to an exact version (or a digest)")
        if keyword == "RUN" and "apt-get install" in rest:
            packages = [w for w in rest.split("apt-get install", 1)[1].split("&&")[0].split()
                        if not w.startswith("-")]
            unpinned = [p for p in packages if "=" not in p]
            if unpinned:
                problems.append(f"apt-get install of unpinned packages: {unpinned}")
    users = [rest for keyword, rest in steps if keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end as a non-root USER (it runs as root otherwise)")
    entrypoint = [rest for keyword, rest in steps if keyword == "ENTRYPOINT"]
    if entrypoint[-1:] != ['["tini", "--"]']:
        problems.append('ENTRYPOINT ["tini", "--"] expected: an init that forwards SIGTERM')
    command = [rest for keyword, rest in steps if keyword == "CMD"]
    expected = "[" + ", ".join(f'"{part}"' for part in contract.COMMAND[2:]) + "]"
    if command[-1:] != [expected]:
        problems.append(f"CMD {expected} expected")
    if ("WORKDIR", contract.WORKDIR) not in steps:
        problems.append(f"WORKDIR {contract.WORKDIR} expected")
    if not any(keyword == "RUN" and "uv sync --frozen --no-default-groups" in rest for keyword, rest in steps):
        problems.append("the Python packages must come from uv.lock: uv sync --frozen --no-default-groups")
    copied = {rest.split()[0] for keyword, rest in steps if keyword == "COPY"}
    missing = [entry for entry in image.IMAGE_FILES if entry not in copied]
    if missing:
        problems.append(f"the image's list names {missing}, which no COPY copies")
    return problems


def dockerfile_problems(dockerfile: Path) -> list[str]:
    return hadolint(dockerfile) + dockerfile_rules(Path(dockerfile).read_text())


def core_files(folder: Path) -> list[Path]:
    return sorted({path for path, obj in objects(folder) if obj["kind"] in CORE_KINDS})
