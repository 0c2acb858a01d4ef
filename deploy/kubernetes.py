"""Plain Kubernetes objects for one model, and the kustomization that ties every model's together.

One Deployment per model: its pods serve every built version of the model (``SERVE_MODELS``), and the front door
inside each pod applies the local A/B split (``AB_SPLITS``, from a ConfigMap), so a Service in front of identical
pods carries the same weights as on one machine.

Decisions:

* rollout ``maxUnavailable: 0, maxSurge: 1``: a new pod must pass its readiness probe before an old one is drained,
  so serving capacity never drops below the replicas the HPA asked for; the price is room for one more pod on the
  nodes during a rollout (requests = limits makes that room explicit);
* no ``spec.replicas``: the HorizontalPodAutoscaler owns the count (from ``minReplicas``); a replicas field would be
  reset by every ``kubectl apply``;
* the HPA scales on ``frontdoor_requests_per_second`` per pod (a rate, served by prometheus-adapter), not CPU: a
  CPU-bound worker pool saturates before its CPU average says so, and a counter never comes down;
* the kustomization uses only what old kustomize understands (``resources`` naming files, ``namespace``,
  ``images``): Debian's kubernetes-client 1.20 bundles kustomize 2.0.
"""

from __future__ import annotations

from typing import Any

from deploy import contract, monitoring
from deploy.plan import ModelPlan, project_version

APP = "torchserve-toolkit"
SERVICE_ACCOUNT = "torchserve-toolkit"
AB_CONFIGMAP_KEY = contract.AB_SPLITS_FILE


def labels(plan: ModelPlan | None = None) -> dict[str, str]:
    base = {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": APP,
            "app.kubernetes.io/version": project_version()}
    if plan is not None:
        base.update({"app.kubernetes.io/instance": plan.name, "app.kubernetes.io/component": "model-server",
                     "torchserve-toolkit/model": plan.model})
    return base


def selector(plan: ModelPlan) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": plan.name}


def meta(name: str, plan: ModelPlan | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "labels": labels(plan), **extra}


def resource(api_version: str, kind: str, plan: ModelPlan, spec: dict[str, Any]) -> dict[str, Any]:
    """A model's object: its kind, its name and labels, its spec."""
    return {"apiVersion": api_version, "kind": kind, "metadata": meta(plan.name, plan), "spec": spec}


def probe(spec: contract.Probe) -> dict[str, Any]:
    return {"httpGet": {"path": spec.path, "port": "http"}, "periodSeconds": spec.period,
            "failureThreshold": spec.failures, "timeoutSeconds": spec.timeout, "initialDelaySeconds": spec.delay}


def container(plan: ModelPlan, image: str) -> dict[str, Any]:
    ab_file = f"{contract.AB_SPLITS_DIR}/{contract.AB_SPLITS_FILE}"
    return {
        "name": "torchserve",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(contract.COMMAND),
        "env": [{"name": k, "value": v}
                for k, v in contract.env(plan, contract.IMAGE_MODEL_STORE, contract.IMAGE_CONFIG, ab_file)],
        "ports": [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in contract.PORTS.items()],
        "resources": contract.resources(plan),
        **{kind: probe(spec) for kind, spec in contract.PROBES.items()},
        "lifecycle": {"preStop": {"exec": {"command": list(contract.PRE_STOP)}}},
        "securityContext": {k: v for k, v in contract.SECURITY_CONTEXT.items() if k != "seccompProfile"},
        "volumeMounts": [{"name": "tmp", "mountPath": contract.TMP},
                         {"name": "ab-splits", "mountPath": contract.AB_SPLITS_DIR, "readOnly": True},
                         {"name": "client-keys", "mountPath": contract.CLIENT_KEYS_DIR, "readOnly": True}],
    }


def deployment(plan: ModelPlan, image: str) -> dict[str, Any]:
    served = container(plan, image)
    # the image holds the archives unpacked: TorchServe extracts nothing into /tmp
    tmp_size = contract.tmp_size(contract.tmp_budget({e["name"]: e["value"] for e in served["env"]}))
    return resource("apps/v1", "Deployment", plan, {
        "selector": {"matchLabels": selector(plan)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "minReadySeconds": 5,
        "revisionHistoryLimit": 5,
        "template": {
            "metadata": {"labels": labels(plan)},
            "spec": {
                "serviceAccountName": SERVICE_ACCOUNT,
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": contract.GRACE_SECONDS,
                "securityContext": {"runAsNonRoot": True, "runAsUser": contract.UID,
                                    "runAsGroup": contract.UID, "fsGroup": contract.UID,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [served],
                "volumes": [
                    {"name": "tmp", "emptyDir": {"sizeLimit": tmp_size}},
                    {"name": "ab-splits", "configMap": {"name": f"{plan.name}-ab-splits"}},
                    {"name": "client-keys", "secret": {"secretName": contract.CLIENT_KEYS_SECRET,
                                                       "defaultMode": 0o440}},
                ],
                "topologySpreadConstraints": [{
                    "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector(plan)}}],
            },
        },
    })


def service(plan: ModelPlan) -> dict[str, Any]:
    return resource("v1", "Service", plan, {
        "type": "ClusterIP",
        "selector": selector(plan),
        "ports": [{"name": name, "port": port, "targetPort": name, "protocol": "TCP",
                   **({"appProtocol": "grpc"} if name == "grpc" else {})}
                  for name, port in contract.PORTS.items()],
    })


def hpa(plan: ModelPlan) -> dict[str, Any]:
    return resource("autoscaling/v2", "HorizontalPodAutoscaler", plan, {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name},
        "minReplicas": plan.min_replicas,
        "maxReplicas": plan.max_replicas,
        "metrics": [{"type": "Pods", "pods": {
            "metric": {"name": monitoring.RPS_METRIC},
            "target": {"type": "AverageValue", "averageValue": str(plan.target_rps)}}}],
        "behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0,
                        "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
            "scaleDown": {"stabilizationWindowSeconds": 300,
                          "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
        },
    })


def pdb(plan: ModelPlan) -> dict[str, Any]:
    return resource("policy/v1", "PodDisruptionBudget", plan, {"maxUnavailable": 1, "selector": {"matchLabels": selector(plan)}})


def network_policy(plan: ModelPlan, gateway_namespace: str, prometheus_namespace: str) -> dict[str, Any]:
    """Inference (HTTP and gRPC) only from the gateway's namespace, metrics only from Prometheus; management has
    no rule, so nothing reaches it (it listens on the pod's loopback anyway)."""
    def namespace(name: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    return resource("networking.k8s.io/v1", "NetworkPolicy", plan, {
        "podSelector": {"matchLabels": selector(plan)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [namespace(gateway_namespace)],
             "ports": [{"protocol": "TCP", "port": contract.PORTS["http"]},
                       {"protocol": "TCP", "port": contract.PORTS["grpc"]}]},
            {"from": [{**namespace(prometheus_namespace),
                       "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
             "ports": [{"protocol": "TCP", "port": contract.PORTS["metrics"]}]},
        ],
    })


def ab_configmap(plan: ModelPlan) -> dict[str, Any]:
    note = (f"split from the {plan.split_source}" if plan.split else "no split: the default version takes all")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(f"{plan.name}-ab-splits", plan, annotations={"torchserve-toolkit/split": note}),
        "data": {AB_CONFIGMAP_KEY: contract.ab_splits(plan)},
    }


def service_monitor(plan: ModelPlan) -> dict[str, Any]:
    return resource("monitoring.coreos.com/v1", "ServiceMonitor", plan, {
        "selector": {"matchLabels": selector(plan)},
        "endpoints": [{"port": "metrics", "path": path, "interval": "15s", "scrapeTimeout": "10s"}
                      for path in ("/metrics", "/metrics/front_door")],
    })


def prometheus_rule(plan: ModelPlan) -> dict[str, Any]:
    return resource("monitoring.coreos.com/v1", "PrometheusRule", plan, {"groups": monitoring.rule_groups(plan)})


def model_objects(plan: ModelPlan, image: str, gateway_namespace: str,
                  prometheus_namespace: str) -> dict[str, dict[str, Any]]:
    """File name → object, for one model's folder."""
    return {
        "deployment.yaml": deployment(plan, image),
        "service.yaml": service(plan),
        "hpa.yaml": hpa(plan),
        "pdb.yaml": pdb(plan),
        "networkpolicy.yaml": network_policy(plan, gateway_namespace, prometheus_namespace),
        "configmap-ab-splits.yaml": ab_configmap(plan),
        "servicemonitor.yaml": service_monitor(plan),
        "prometheusrule.yaml": prometheus_rule(plan),
    }


def shared_objects(namespace: str) -> dict[str, dict[str, Any]]:
    return {
        "namespace.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": meta(namespace)},
        "serviceaccount.yaml": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(SERVICE_ACCOUNT),
                                "automountServiceAccountToken": False},
    }


def kustomization(resources: list[str], namespace: str, image: str) -> dict[str, Any]:
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": resources,
        # retarget the image here (your registry, a digest) without touching the manifests
        "images": [{"name": name, "newName": name, **({"newTag": tag} if tag else {})}],
    }
