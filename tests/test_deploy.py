"""make deploy and its offline proofs: the generated folder passes every validator, and each validator rejects what it
should (a canary in Standard mode, a bad name, requests != limits, workers × threads over the CPU limit, an unknown
field under --strict, a probe on /ping, a Dockerfile running as root, an alert that no longer fires).

The kserve SDK cannot share a process with tritonclient (both register protobuf's ``inference.ServerLiveRequest``),
so whatever imports kserve runs in ``python -m deploy``'s own process; everything else is called here directly.
Needs the built model store (make archive).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from archives.store import Manifest
from deploy import KUBERNETES_VERSIONS, checks, contract, image, monitoring
from deploy.plan import plan_models
from serving.logs import all_caps

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")

pytestmark = pytest.mark.skipif(not Manifest().entries(), reason="no built archives: make archive")


def deploy(*args: str, home: Path) -> subprocess.CompletedProcess:
    """``python -m deploy`` as make runs it, with a SERVE_HOME of its own (no running front door's split)."""
    return subprocess.run([PYTHON, "-m", "deploy", *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "SERVE_HOME": str(home)})


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """Every built model, rendered and checked once."""
    work = tmp_path_factory.mktemp("deploy")
    ok(deploy("--out", str(work / "out"), home=work / "serve"))
    return work / "out"


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("canary")
    ok(deploy("--model", "digits", "--split", "1.0=90 2.0=10", "--out", str(work / "out"), home=work / "serve"))
    return work / "out"


# --- the real output passes ----------------------------------------------------------------------------------------


def test_every_model_renders_and_passes_every_validator(rendered):
    built = sorted(Manifest().models)
    for model in built:
        assert (rendered / "kubernetes" / model / "deployment.yaml").is_file()
        assert (rendered / "kserve" / model / "inferenceservice-standard.yaml").is_file()
        assert (rendered / "kserve" / model / "inferenceservice-knative.yaml").is_file()
        store = rendered / "kserve" / model / "storage" / "model-store"
        assert sorted(p.name for p in store.glob("*.mar")) == sorted(
            e["archive"] for e in Manifest().entries() if e["model"] == model)
    output = ok(deploy("check", "--out", str(rendered), home=rendered.parent / "serve"))
    for validator in ("kubernetes-validate", "kubernetes contract", "kubectl kustomize", "kserve admission",
                      "kserve SDK models", "promtool", "hadolint + Dockerfile contract"):
        assert f"{validator}: ok" in output, output
    assert f"Kubernetes {', '.join(KUBERNETES_VERSIONS)}" in output
    assert output.count("promtool test rules") == 2 * len(built) and "FAILED" not in output
    assert "deploy check: all passed" in output


def test_deployment_is_sized_from_the_archives(rendered):
    for plan in plan_models(use_running=False):
        dep = read(rendered / "kubernetes" / plan.model / "deployment.yaml")
        [c] = dep["spec"]["template"]["spec"]["containers"]
        assert c["resources"]["requests"] == c["resources"]["limits"]
        assert checks.quantity(c["resources"]["limits"]["cpu"]) >= plan.worker_threads > 0
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["SERVE_MODELS"] == plan.model and env["OMP_NUM_THREADS"] == "1"
        assert env["TS_NUMBER_OF_NETTY_THREADS"] == c["resources"]["limits"]["cpu"]
        assert c["command"] == ["tini", "--", "/opt/toolkit/serve.sh", "run"]
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
            int(env["DRAIN_SECONDS"]) + contract.STOP_BUDGET_SECONDS


def test_serving_runtime_pins_torchserve_0_12(rendered):
    runtime = read(rendered / "kserve" / "servingruntime.yaml")
    [c] = runtime["spec"]["containers"]
    assert c["image"].endswith("-torchserve0.12.0")
    assert runtime["metadata"]["annotations"]["torchserve-toolkit/torchserve-version"].startswith("0.12")
    assert runtime["spec"]["supportedModelFormats"][0]["autoSelect"] is False
    assert {e["name"]: e["value"] for e in c["env"]}["MODEL_STORE"] == "/mnt/models/model-store"
    for variant, mode in (("standard", "Standard"), ("knative", "Knative")):
        isvc = read(rendered / "kserve" / "digits" / f"inferenceservice-{variant}.yaml")
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == mode
        assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]  # no split: no canary
    config = (rendered / "kserve" / "digits" / "storage" / "config" / "config.properties").read_text()
    snapshot = json.loads(next(line for line in config.splitlines()
                               if line.startswith("model_snapshot="))[len("model_snapshot="):])
    versions = snapshot["models"]["digits"]
    assert {v["marName"] for v in versions.values()} == {"digits_1.0.mar", "digits_2.0.mar"}
    assert [v for v, s in versions.items() if s["defaultVersion"]] == ["2.0"]
    assert "model_store=/mnt/models/model-store" in config


# --- the split maps onto the canary and the routes ----------------------------------------------------------------


def test_canary_weight_equals_the_split(canary):
    knative = read(canary / "kserve" / "digits" / "inferenceservice-knative.yaml")["spec"]["predictor"]
    assert knative["canaryTrafficPercent"] == 10 and knative["minReplicas"] == 0
    assert {"name": "TS_CONFIG_FILE", "value": "/mnt/models/config/config-2.0.properties"} in knative["model"]["env"]
    standard = read(canary / "kserve" / "digits" / "inferenceservice-standard.yaml")["spec"]["predictor"]
    assert "canaryTrafficPercent" not in standard
    split = {"digits": {"1.0": 90.0, "2.0": 10.0}}
    configmap = read(canary / "kubernetes" / "digits" / "configmap-ab-splits.yaml")
    assert json.loads(configmap["data"][contract.AB_SPLITS_FILE]) == split
    assert json.loads((canary / "kserve" / "digits" / "storage" / "config" / "ab-splits.json").read_text()) == split
    new = (canary / "kserve" / "digits" / "storage" / "config" / "config-2.0.properties").read_text()
    assert '"2.0":{"defaultVersion":true' in new


def test_a_split_knative_cannot_express_is_refused(tmp_path):
    result = deploy("--model", "digits", "--split", "1.0=2 2.0=1", "--out", str(tmp_path / "out"),
                    home=tmp_path / "serve")
    assert result.returncode == 1 and "whole percent" in result.stderr and "Traceback" not in result.stderr
    result = deploy("--model", "digits", "--split", "1.0=90 3.0=10", "--out", str(tmp_path / "out"),
                    home=tmp_path / "serve")
    assert result.returncode == 1 and "not built" in result.stderr


def test_the_running_front_doors_split_wins(tmp_path, monkeypatch):
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    (proxy / "nginx.pid").write_text(str(os.getpid()))  # a live process: the front door "runs"
    (proxy / "routes.json").write_text(json.dumps({"generation": 3, "models": {"digits": {
        "split": {"1.0": 75.0, "2.0": 25.0}, "default": "1.0", "history": []}}}))
    monkeypatch.setenv("SERVE_HOME", str(tmp_path))
    [plan] = plan_models(["digits"], split="1.0=50 2.0=50")
    assert plan.split == {"1.0": 75.0, "2.0": 25.0} and plan.split_source == "front door"
    assert plan.canary() == ("2.0", 25)
    [plan] = plan_models(["minilm"], split="1.0=50 1.1=50")  # not routed: the option
    assert plan.split_source == "option" and plan.canary() == ("1.1", 50)


# --- each validator rejects what it should -------------------------------------------------------------------------


def _deployment(rendered: Path) -> dict:
    return read(rendered / "kubernetes" / "digits" / "deployment.yaml")


def _container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_deployment_contract_rejects_tampering(rendered):
    assert checks.deployment_problems(_deployment(rendered)) == []
    cases = {
        "requests": lambda c, d: c["resources"]["requests"].update(cpu="2"),
        "workers × threads": lambda c, d: (c["resources"]["requests"].update(cpu="1"),
                                           c["resources"]["limits"].update(cpu="1")),
        "OMP_NUM_THREADS": lambda c, d: c["env"].remove({"name": "OMP_NUM_THREADS", "value": "1"}),
        "/ping needs the inference key": lambda c, d: c["readinessProbe"]["httpGet"].update(path="/ping"),
        "preStop": lambda c, d: c.pop("lifecycle"),
        "terminationGracePeriodSeconds": lambda c, d: d["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30),
        "non-root": lambda c, d: (c["securityContext"].update(runAsNonRoot=False),
                                  d["spec"]["template"]["spec"]["securityContext"].update(runAsNonRoot=False)),
        "readOnlyRootFilesystem": lambda c, d: c["securityContext"].pop("readOnlyRootFilesystem"),
        "maxUnavailable": lambda c, d: d["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1, maxSurge=1),
    }
    for expected, tamper in cases.items():
        dep = copy.deepcopy(_deployment(rendered))
        tamper(_container(dep), dep)
        problems = checks.deployment_problems(dep)
        assert any(expected in problem for problem in problems), (expected, problems)


def _env_value(container: dict, name: str, value: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + [{"name": name, "value": value}]


def test_the_tmp_budget_rejects_a_small_emptydir_and_follows_the_pods_environment(rendered):
    dep = _deployment(rendered)
    tmp = dep["spec"]["template"]["spec"]["volumes"][0]
    pod = dep["spec"]["template"]["spec"]
    assert tmp["name"] == "tmp" and checks.tmp_problems("digits", pod, _container(dep)) == []
    small = copy.deepcopy(dep)
    small["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = "256Mi"
    assert any("sizeLimit 256Mi is under what the pod may write" in p for p in checks.deployment_problems(small))
    # larger logs in the pod's environment (serving/logs.py reads the same variables) need a larger /tmp
    larger = copy.deepcopy(dep)
    _env_value(_container(larger), "LOG_MAX_BYTES", str(2**30))
    assert any("is under what the pod may write" in p for p in checks.deployment_problems(larger))
    elsewhere = copy.deepcopy(dep)
    _env_value(_container(elsewhere), "LOG_DIR", "/var/log/toolkit")
    assert any("LOG_DIR must lie under /tmp" in p for p in checks.deployment_problems(elsewhere))
    runtime = read(rendered / "kserve" / "servingruntime.yaml")
    assert checks.runtime_problems(runtime, extracted=0) == []
    assert any("the extracted archives" in p for p in checks.runtime_problems(runtime, extracted=2**40))


def test_the_tmp_budget_counts_every_log_at_its_cap_and_fits_the_emptydir(rendered):
    """Each log's cap from its own configuration (log4j2.xml's sizes read here with a regular expression), the sum
    under the rendered emptyDir's sizeLimit; KServe's runtime also holds the largest model's archives extracted (their
    unpacked folders' sizes on disk)."""
    log4j = (REPO / "log4j2.xml").read_text()
    size = re.search(r'<Property name="rolled_size">(\d+) MB</Property>', log4j)
    files = re.search(r'<Property name="rolled_files">(\d+)</Property>', log4j)
    assert size and files and log4j.count("${rolled_size}") == log4j.count("<RollingFile ") == 4
    for plan in plan_models(use_running=False):
        dep = read(rendered / "kubernetes" / plan.model / "deployment.yaml")
        env = {e["name"]: e["value"] for e in _container(dep)["env"]}
        budget = contract.tmp_budget(env)
        caps = all_caps(env)
        for name in ("access_log.log", "model_log.log", "ts_log.log", "ts_metrics.log"):
            assert caps[name].disk_bytes >= int(size.group(1)) * 2**20 * (1 + int(files.group(1)))
        for name in ("proxy-access.log", "proxy-error.log", "torchserve.out", "health.log", "v2.log"):
            assert caps[name].disk_bytes >= caps[name].max_bytes * (1 + caps[name].backups) > 0
        assert sum(budget.values()) == sum(c.disk_bytes for c in caps.values()) + contract.STATE_BYTES
        limit = checks.byte_quantity(dep["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"])
        assert sum(budget.values()) < limit <= 1.2 * sum(budget.values()) + contract.TMP_STEP_MI * 2**20, \
            (budget, limit)
    runtime = read(rendered / "kserve" / "servingruntime.yaml")
    runtime_env = {e["name"]: e["value"] for e in runtime["spec"]["containers"][0]["env"]}
    unpacked: Counter = Counter()  # model → its versions' unpacked folders, bytes on disk
    for entry in Manifest().entries():
        folder = Manifest().store / entry["archive"].removesuffix(".mar")
        unpacked[entry["model"]] += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    limit = checks.byte_quantity(next(v for v in runtime["spec"]["volumes"] if v["name"] == "tmp")["emptyDir"]
                                 ["sizeLimit"])
    assert sum(contract.tmp_budget(runtime_env).values()) + max(unpacked.values()) < limit


def test_autoscaling_and_network_policy_rules(rendered):
    hpa = read(rendered / "kubernetes" / "digits" / "hpa.yaml")
    pdb = read(rendered / "kubernetes" / "digits" / "pdb.yaml")
    assert checks.autoscaling_problems(hpa, pdb) == []
    counter = copy.deepcopy(hpa)
    counter["spec"]["metrics"][0]["pods"]["metric"]["name"] = "frontdoor_requests_total"
    assert any("cumulative counter" in p for p in checks.autoscaling_problems(counter))
    blocking = copy.deepcopy(pdb)
    blocking["spec"] = {"minAvailable": 2, "selector": pdb["spec"]["selector"]}
    assert any("blocks every drain" in p for p in checks.autoscaling_problems(hpa, blocking))
    policy = read(rendered / "kubernetes" / "digits" / "networkpolicy.yaml")
    assert checks.network_policy_problems(policy) == []
    open_management = copy.deepcopy(policy)
    open_management["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 8081})
    assert checks.network_policy_problems(open_management)
    everyone = copy.deepcopy(policy)
    everyone["spec"]["ingress"][1]["from"] = [{}]
    assert checks.network_policy_problems(everyone)


def test_kubernetes_validate_strict_rejects_unknown_fields_and_unknown_kinds(rendered, tmp_path):
    dep = _deployment(rendered)
    dep["spec"]["bogusField"] = 1
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(dep))
    monitor = rendered / "kubernetes" / "digits" / "servicemonitor.yaml"
    service = rendered / "kubernetes" / "digits" / "service.yaml"
    problems = checks.kubernetes_validate([tmp_path / "deployment.yaml", monitor, service], versions=("1.37",))
    assert any("bogusField" in p and p.startswith("kubernetes 1.37: ERROR") for p in problems), problems
    assert any("WARN" in p and "ServiceMonitor" in p for p in problems), problems  # an unknown kind is a failure
    assert not any("service.yaml" in p for p in problems)


def test_kserve_admission_rules_reject_tampering(rendered):
    runtime = read(rendered / "kserve" / "servingruntime.yaml")
    runtimes = {runtime["metadata"]["name"]: runtime}
    standard = read(rendered / "kserve" / "digits" / "inferenceservice-standard.yaml")
    knative = read(rendered / "kserve" / "digits" / "inferenceservice-knative.yaml")
    assert checks.isvc_problems(standard, runtimes) == [] and checks.isvc_problems(knative, runtimes) == []

    def rejected(isvc: dict, expected: str, tamper) -> None:
        tampered = copy.deepcopy(isvc)
        tamper(tampered)
        problems = checks.isvc_problems(tampered, runtimes)
        assert any(expected in problem for problem in problems), (expected, problems)

    predictor = lambda i: i["spec"]["predictor"]  # noqa: E731
    rejected(standard, "only in Knative mode", lambda i: predictor(i).update(canaryTrafficPercent=10))
    rejected(knative, "0 to 100", lambda i: predictor(i).update(canaryTrafficPercent=120))
    rejected(standard, "DNS-1035", lambda i: i["metadata"].update(name="super_resolution"))
    rejected(standard, "DNS-1035", lambda i: i["metadata"].update(name="a" * 46))
    rejected(standard, "deploymentMode must be set", lambda i: i["metadata"]["annotations"].pop(checks.DEPLOYMENT_MODE))
    rejected(standard, "deploymentMode must be set",
             lambda i: i["metadata"]["annotations"].update({checks.DEPLOYMENT_MODE: "Serverfull"}))
    rejected(standard, "not a supported metric", lambda i: predictor(i).update(scaleMetric="rps"))
    rejected(knative, "not a supported metric", lambda i: predictor(i).update(scaleMetric="cpu"))
    rejected(standard, "minReplicas 5 > maxReplicas 3", lambda i: predictor(i).update(minReplicas=5, maxReplicas=3))
    rejected(standard, "cannot scale to zero", lambda i: predictor(i).update(minReplicas=0))
    rejected(knative, "deploymentStrategy", lambda i: predictor(i).update(deploymentStrategy={"type": "Recreate"}))
    rejected(standard, "runtime", lambda i: predictor(i)["model"].update(runtime="kserve-torchserve"))
    assert checks.runtime_problems(runtime) == []
    old = copy.deepcopy(runtime)
    old["spec"]["containers"][0]["image"] = "pytorch/torchserve-kfs:0.9.0"
    assert any("pin TorchServe 0.12" in p for p in checks.runtime_problems(old))


def test_kserve_sdk_models_reject_unknown_fields(rendered, tmp_path):
    """In a process of its own: it imports kserve."""
    isvc = read(rendered / "kserve" / "digits" / "inferenceservice-knative.yaml")
    isvc["spec"]["predictor"]["canaryTraficPercent"] = 10  # misspelt: the SDK has no such field
    isvc["spec"]["predictor"]["minReplicas"] = "0"
    (tmp_path / "isvc.yaml").write_text(yaml.safe_dump(isvc))
    script = ("import sys, yaml; from deploy.kserve import sdk_problems; "
              "print('\\n'.join(sdk_problems(yaml.safe_load(open(sys.argv[1])))))")
    output = ok(subprocess.run([PYTHON, "-c", script, str(tmp_path / "isvc.yaml")], capture_output=True, text=True,
                               cwd=REPO, timeout=120))
    assert "canaryTraficPercent: unknown field" in output
    assert "minReplicas: '0' is not int" in output


def test_promtool_unit_tests_catch_an_alert_that_no_longer_fires(rendered, tmp_path):
    folder = tmp_path / "kubernetes"
    shutil.copytree(rendered / "kubernetes" / "digits", folder / "digits")
    plans = plan_models(["digits"], use_running=False)
    problems, lines = checks.promtool_problems(folder, plans)
    assert problems == [] and len(lines) == 3
    rule = read(folder / "digits" / "prometheusrule.yaml")
    rule["spec"]["groups"][0]["rules"][0]["expr"] = rule["spec"]["groups"][0]["rules"][0]["expr"].replace(
        "> 0.05", "> 0.5")  # now blind to a 20 % error ratio
    (folder / "digits" / "prometheusrule.yaml").write_text(yaml.safe_dump(rule))
    problems, _ = checks.promtool_problems(folder, plans)
    assert len(problems) == 1 and "ModelVersionErrorRatioHigh" in problems[0]
    rule["spec"]["groups"][0]["rules"][1]["expr"] = "histogram_quantile(0.99, rate(x[5m]) >"
    (folder / "digits" / "prometheusrule.yaml").write_text(yaml.safe_dump(rule))
    problems, _ = checks.promtool_problems(folder, plans)
    assert any("check rules failed" in p for p in problems)


def test_the_adapters_rate_counts_predictions_not_probes(rendered, tmp_path):
    rules = rendered / "prometheus-adapter" / "rules.yaml"
    assert checks.adapter_problems(rules) == []
    config = read(rules)
    # without its api filter the HPA would scale on the probes too: 8 requests a second instead of 3
    config["rules"][0]["metricsQuery"] = re.sub(r',api=~"[^"]*"', "", config["rules"][0]["metricsQuery"])
    tampered = tmp_path / "rules.yaml"
    tampered.write_text(yaml.safe_dump(config))
    [problem] = checks.adapter_problems(tampered)
    assert "expected" in problem or "exp" in problem, problem
    # on every request the door answered, strangers' 401s included, it would read 13 a second: anyone could scale it
    config = read(rules)
    config["rules"][0] = json.loads(json.dumps(config["rules"][0]).replace(monitoring.RPS_SOURCE,
                                                                          "frontdoor_requests_total"))
    tampered.write_text(yaml.safe_dump(config))
    [problem] = checks.adapter_problems(tampered)
    assert 'got: {pod="p"} 1.3E+01' in problem, problem


def test_kustomize_renders_and_notices_a_missing_file(rendered, tmp_path):
    assert checks.kustomize_problems(rendered / "kubernetes") == []
    folder = tmp_path / "kubernetes"
    shutil.copytree(rendered / "kubernetes", folder)
    (folder / "digits" / "pdb.yaml").unlink()
    assert checks.kustomize_problems(folder)


def test_dockerfile_contract_and_hadolint(rendered, tmp_path):
    text = (rendered / "Dockerfile").read_text()
    assert checks.dockerfile_problems(rendered / "Dockerfile") == []
    cases = {
        "non-root USER": text.replace("USER 10001:10001\n", ""),  # no USER: the image runs as root
        "DL3002": text.replace("USER 10001:10001", "USER root"),  # hadolint: last USER should not be root
        "unpinned": text.replace("tini=0.19.0-1+b3", "tini"),
        "pin the base image": text.replace("python:3.11.7-slim-bookworm", "python:3.11-slim"),
        "ENTRYPOINT": text.replace('ENTRYPOINT ["tini", "--"]', 'ENTRYPOINT ["/opt/toolkit/serve.sh"]'),
        "no COPY copies": text.replace("COPY manage/ manage/\n", ""),
    }
    for expected, tampered in cases.items():
        path = tmp_path / "Dockerfile"
        path.write_text(tampered)
        problems = checks.dockerfile_problems(path)
        assert any(expected in problem for problem in problems), (expected, problems)


def test_stage_image_carries_exactly_the_image_list(tmp_path):
    staged = image.stage_image(tmp_path / "image", venv=False)
    for entry in image.RUNTIME_FILES + image.DEPENDENCY_FILES:
        assert (staged / entry.rstrip("/")).exists(), entry
    assert os.access(staged / "serve.sh", os.X_OK)
    assert (staged / "manage" / "__main__.py").is_file() and (staged / "handlers" / "site").is_dir()
    assert not list(staged.rglob("__pycache__"))
    assert not (staged / "export").exists() and not (staged / "tests").exists()  # build and test code stay out
    for entry in Manifest().entries():
        assert (staged / "model_store" / entry["archive"]).is_file()
        assert (staged / "model_store" / entry["archive"].removesuffix(".mar") / "MAR-INF").is_dir()  # unpacked
    ignore = image.dockerignore().splitlines()
    assert ignore[1] == "*" and all(f"!{entry.rstrip('/')}" in ignore for entry in image.IMAGE_FILES)


def test_deploy_never_imports_kserve_in_a_callers_process():
    script = ("import sys; import deploy.render, deploy.checks, deploy.plan, deploy.kubernetes, deploy.image, "
              "deploy.monitoring, deploy.contract; print('kserve' in sys.modules, 'kubernetes' in sys.modules)")
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok(result).split() == ["False", "False"]
