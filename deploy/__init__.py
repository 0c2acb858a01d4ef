"""``make deploy``: the built archives as Kubernetes and KServe manifests, a serving image, and their offline checks.

``python -m deploy [--model M] [--split "1.0=90 2.0=10"]`` renders into ``deploy/out/`` (replaced each time):

* ``kubernetes/``: plain Kubernetes, one folder per model (Deployment, Service, HorizontalPodAutoscaler,
  PodDisruptionBudget, NetworkPolicy, ServiceMonitor, PrometheusRule, the A/B split's ConfigMap), the shared
  Namespace and ServiceAccount, and a ``kustomization.yaml`` listing them (``kubectl apply -k``); beside it, the
  prometheus-adapter rule that turns the front door's request counter into the HPA's per-pod rate;
* ``kserve/``: a namespaced ``ServingRuntime`` running our own image (TorchServe as the toolkit pins it, not KServe's
  built-in TorchServe runtime), and per model an ``InferenceService`` in Standard (HPA) and Knative (scale to zero,
  canary) variants plus the storage layout KServe mounts at ``/mnt/models`` (``config/config.properties``,
  ``model-store/``);
* ``Dockerfile`` and ``Dockerfile.dockerignore``: the serving image, built from the repository root.

``python -m deploy check`` proves the folder offline (``deploy/checks.py``): kubernetes-validate ``--strict`` for
each Kubernetes version in ``KUBERNETES_VERSIONS``, KServe's admission rules, the kserve SDK's models, promtool,
``kubectl kustomize`` and hadolint.

Why in-process callers never import kserve: the kserve SDK and tritonclient both register the protobuf message
``inference.ServerLiveRequest``, so one Python process cannot hold both ("duplicate symbol"), and the test suite
imports tritonclient. The KServe part therefore runs in ``python -m deploy``'s own process, and ``render.render_all``
called from any other process starts one for it.
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
# Kubernetes versions every core manifest is validated against (kubernetes-validate ships their schemas): the
# newest it knows, and two older minors still in providers' support windows.
KUBERNETES_VERSIONS = ("1.32", "1.35", "1.37")
# True in ``python -m deploy``'s own process, where importing kserve is safe (see above).
OWN_PROCESS = False
