"""The container contract: what the serving image holds and how a pod runs it, the same for Kubernetes and KServe.

serve.sh implements it (``serve.sh run`` and ``serve.sh drain``); the manifests and the Dockerfile are generated from
it, so the three cannot disagree:

* the image's working directory ``/opt/toolkit`` holds the toolkit's runtime files (``deploy/image.py``) and its
  ``.venv``; the model store ``/opt/toolkit/model_store`` holds the versions unpacked (and, from the rendered
  Dockerfile, their archives), prepared at build time, so the root filesystem can be read-only; everything written goes under ``/tmp`` (an emptyDir), whose
  size limit is what may be written there at worst (``tmp_budget``): every log at its cap (``serving/logs.py``,
  ``log4j2.xml``), SERVE_HOME's state and, where TorchServe loads archives itself, what it extracts;
* the command is ``tini -- /opt/toolkit/serve.sh run``: tini (PID 1) forwards SIGTERM to serve.sh, which stops the
  front door gracefully, then TorchServe, and exits 0;
* ports: 8080 inference (``/predictions``, ``/explanations``, ``/health/*``, Open Inference Protocol REST ``/v2``),
  8082 metrics (``/metrics``, ``/metrics/front_door``), 8083 Open Inference Protocol gRPC; management stays on the
  pod's loopback (8081);
* probes call the front door's ``/health/live`` and ``/health/ready``, which need no key (TorchServe's ``/ping``
  needs the inference key, so a probe of it fails once token authorization is on);
* ``preStop`` runs ``serve.sh drain``: the pod says not ready and waits ``DRAIN_SECONDS`` while the endpoints
  controller takes it out of the Service, before the kubelet sends SIGTERM (TorchServe itself does not drain);
* thread variables: the workers' libraries see the node's cores, so OpenMP/MKL get one thread each (the handlers set
  their own intra-op threads from ``handler.threads``) and TorchServe's netty pools are sized to the CPU limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from deploy.plan import ModelPlan
from serving import logs

WORKDIR = "/opt/toolkit"
SERVE = f"{WORKDIR}/serve.sh"
COMMAND = ["tini", "--", SERVE, "run"]
PRE_STOP = [SERVE, "drain"]
UID = 10001  # the image's non-root user (numeric, so runAsNonRoot can be verified)
PORTS = {"http": 8080, "metrics": 8082, "grpc": 8083}
MANAGEMENT_ADDRESS = "http://127.0.0.1:8081"
IMAGE_MODEL_STORE = f"{WORKDIR}/model_store"
IMAGE_CONFIG = f"{WORKDIR}/config.properties"
KSERVE_ROOT = "/mnt/models"  # where KServe's storage initializer puts a model's storageUri
KSERVE_MODEL_STORE = f"{KSERVE_ROOT}/model-store"
KSERVE_CONFIG = f"{KSERVE_ROOT}/config/config.properties"
AB_SPLITS_DIR = "/etc/toolkit"
AB_SPLITS_FILE = "ab-splits.json"
# The clients' inference keys: TorchServe makes a random key per instance, so replicas behind one Service share none
# of TorchServe's; the front door accepts these on every replica (CLIENT_KEYS_FILE, one key per line). The Secret is
# the user's: kubectl create secret generic torchserve-toolkit-client-keys --from-file=keys=<file>
CLIENT_KEYS_SECRET = "torchserve-toolkit-client-keys"
CLIENT_KEYS_DIR = "/etc/toolkit-keys"
CLIENT_KEYS_FILE = f"{CLIENT_KEYS_DIR}/keys"
DRAIN_SECONDS = 10  # preStop: long enough for the endpoints controller and kube-proxy to drop the pod
STOP_BUDGET_SECONDS = 30  # serve.sh: the front door's graceful stop, then TorchServe's
GRACE_SECONDS = DRAIN_SECONDS + STOP_BUDGET_SECONDS + 5
TMP = "/tmp"  # LOG_DIR and SERVE_HOME (base_env), an emptyDir sized by tmp_budget
# SERVE_HOME's own files, measured at a few hundred KiB (tests/test_logs.py holds it to this): pid files, the key
# file, the rendered nginx configuration and routing table, the workers' sockets, the links TorchServe makes to the
# unpacked folders it serves (SERVE_HOME/tmp, Java's temp folder).
STATE_BYTES = 16 * logs.MIB
# nginx's temp folders stay empty: a request body is held in memory up to the body limit (client_body_buffer_size
# = client_max_body_size) and answers are not buffered (proxy_buffering off); tests/test_logs.py holds
# serving/nginx.conf.j2 to that.
NGINX_TEMP_BYTES = 0
TMP_HEADROOM = 0.10  # over the sum: what no item counts (a Python traceback, the JVM's hsperfdata)
TMP_STEP_MI = 64


@dataclass(frozen=True)
class Probe:
    path: str
    period: int
    failures: int
    timeout: int = 3
    delay: int = 0


# startup: up to 60 × 5 s = 5 minutes for every worker to load (minilm's TorchScript worker on a busy node);
# readiness: out of the Service after 2 failed checks; liveness: restarted after 30 s without a live frontend.
PROBES = {
    "startupProbe": Probe("/health/live", period=5, failures=60),
    "readinessProbe": Probe("/health/ready", period=5, failures=2),
    "livenessProbe": Probe("/health/live", period=10, failures=3),
}


def ab_splits(plan: ModelPlan) -> str:
    """The AB_SPLITS file's content: ``{"<model>": {"<version>": weight}}``, ``{}`` without a split."""
    return json.dumps({plan.model: plan.split} if plan.split else {}, sort_keys=True) + "\n"


def base_env(model_store: str, config_file: str) -> list[tuple[str, str]]:
    """The environment every pod of the image gets, whatever it serves."""
    return [
        ("SERVE_HOME", f"{TMP}/serve"),
        ("LOG_DIR", f"{TMP}/logs"),
        ("MODEL_STORE", model_store),
        ("TS_CONFIG_FILE", config_file),
        ("PROXY_ADDRESS", f"http://0.0.0.0:{PORTS['http']}"),
        ("PROXY_METRICS_ADDRESS", f"http://0.0.0.0:{PORTS['metrics']}"),
        ("PROXY_MANAGEMENT_ADDRESS", MANAGEMENT_ADDRESS),
        ("V2_GRPC_ADDRESS", f"0.0.0.0:{PORTS['grpc']}"),
        ("DRAIN_SECONDS", str(DRAIN_SECONDS)),
        ("CLIENT_KEYS_FILE", CLIENT_KEYS_FILE),
        ("OMP_NUM_THREADS", "1"),
        ("MKL_NUM_THREADS", "1"),
    ]


def model_env(plan: ModelPlan, ab_splits_file: str | None) -> list[tuple[str, str]]:
    """What depends on the model a pod serves: which models, netty pools sized to its CPU limit, the split."""
    cpu = str(plan.cpu)
    pairs = [("SERVE_MODELS", plan.model), ("TS_NUMBER_OF_NETTY_THREADS", cpu), ("TS_NETTY_CLIENT_THREADS", cpu)]
    if ab_splits_file:
        pairs.append(("AB_SPLITS", ab_splits_file))
    return pairs


def env(plan: ModelPlan, model_store: str, config_file: str, ab_splits_file: str | None) -> list[tuple[str, str]]:
    """The container's environment, in order."""
    served, *sized = model_env(plan, ab_splits_file)
    return [served, *base_env(model_store, config_file), *sized]


def extracted_bytes(plan: ModelPlan) -> int:
    """What TorchServe extracts into its temp folder (SERVE_HOME/tmp) when it loads a model's archives itself: under
    KServe's read-only mount, which holds no unpacked copy (the image's model store does)."""
    return sum(v.unpacked_bytes for v in plan.versions)


def tmp_budget(env: Mapping[str, str], extracted: int = 0) -> dict[str, int]:
    """What a pod with the environment ``env`` may hold in /tmp at worst, bytes by item: every log in LOG_DIR at its
    cap (rotated files included), SERVE_HOME's state, nginx's temp files, and ``extracted`` archives."""
    items = {f"log {name} ({cap.how})": cap.disk_bytes for name, cap in logs.all_caps(env).items()}
    items["SERVE_HOME state"] = STATE_BYTES
    items["nginx temp files"] = NGINX_TEMP_BYTES
    if extracted:
        items["archives TorchServe extracts"] = extracted
    return items


def tmp_size(budget: Mapping[str, int]) -> str:
    """The emptyDir's sizeLimit for a budget: its sum, TMP_HEADROOM more, rounded up to TMP_STEP_MI."""
    mi = sum(budget.values()) * (1 + TMP_HEADROOM) / logs.MIB
    return f"{math.ceil(mi / TMP_STEP_MI) * TMP_STEP_MI}Mi"


def resources(plan: ModelPlan) -> dict[str, dict[str, str]]:
    """Requests equal to limits: CPU for Σ workers × threads plus the frontend, memory from the estimate."""
    amounts = {"cpu": str(plan.cpu), "memory": f"{plan.memory_mi}Mi"}
    return {"requests": dict(amounts), "limits": dict(amounts)}


SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
