"""Imports and builds at the same time into one model store and one folder of specs, as real processes: every
version lands, numbered apart, in the spec, the store and the manifest; a failed import takes back only its own
version; a name or version that is not one by the rule is refused before anything is written.

The imported model is a tiny CNN trained here for a moment on scikit-learn's digits and saved as TorchScript (the
cheapest FROM: its file is shipped as it is, no export); the built ones are test_build's digits spec. Each process
gets its own SERVE_HOME, where no TorchServe runs, so nothing is registered.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import build_mar
from archives import load_spec
from archives.store import MANIFEST, Manifest, sha256_file
from export.importer import Plan, Refused, Request, plan_import, withdraw, write_spec

from tests.conftest import one_line_error, refusal_line
from tests.test_build import SPEC as DIGITS_SPEC

REPO = Path(__file__).resolve().parent.parent
TRAIN_STEPS = 60
EVAL_PER_CLASS = 3
PROCESS_TIMEOUT = 240  # seconds, for each process of a concurrent run on 2 busy cores
POLL_SECONDS = 0.05


class TinyNet(torch.nn.Module):
    """One convolution, pooled: any image size in, ten digit scores out."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Files:
    trained: Path  # TorchScript, trained on the digits
    untrained: Path  # TorchScript, initial weights: under any sensible MIN_ACCURACY
    labels: Path  # one digit a line
    eval_dir: Path  # held-out digits as PNG, <digit>/<n>.png


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    from export import digits
    from export.samples import encode

    root = tmp_path_factory.mktemp("user_files")
    images, labels = digits.digit_images()
    inputs = torch.from_numpy(images / 255.0).float()[:, None].repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    untrained = TinyNet().eval()
    torch.jit.save(torch.jit.script(untrained), str(root / "untrained.pt"))
    trained = TinyNet()
    optimizer = torch.optim.Adam(trained.parameters(), lr=0.02)
    for _ in range(TRAIN_STEPS):
        loss = torch.nn.functional.cross_entropy(trained(inputs), torch.from_numpy(labels).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.jit.save(torch.jit.script(trained.eval()), str(root / "trained.pt"))
    (root / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    held, held_labels = digits.held_out()
    counts: dict[int, int] = {}
    for image, label in zip(held, held_labels):
        if counts.get(int(label), 0) < EVAL_PER_CLASS:
            (root / "eval" / str(label)).mkdir(parents=True, exist_ok=True)
            (root / "eval" / str(label) / f"{counts.get(int(label), 0)}.png").write_bytes(encode(image, "PNG"))
            counts[int(label)] = counts.get(int(label), 0) + 1
    return Files(root / "trained.pt", root / "untrained.pt", root / "labels.txt", root / "eval")


@pytest.fixture
def place(tmp_path) -> dict[str, Path]:
    """A folder of specs, a model store and a SERVE_HOME of the test's own (no TorchServe: nothing registers)."""
    for name in ("specs", "home"):
        (tmp_path / name).mkdir()
    return {"specs": tmp_path / "specs", "store": tmp_path / "store", "home": tmp_path / "home", "logs": tmp_path}


def env_of(place: dict[str, Path]) -> dict[str, str]:
    return {**os.environ, "MODEL_STORE": str(place["store"]), "SERVE_HOME": str(place["home"])}


def start(place: dict[str, Path], label: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """A process started now, its output to files (a process holding a lock never waits on a full pipe)."""
    out = place["logs"] / f"{label}.out"
    with open(out, "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env_of(place), stdout=stdout,
                                stderr=stderr, text=True), out


def finish(running: dict[str, tuple[subprocess.Popen, Path]]) -> dict[str, subprocess.CompletedProcess]:
    results = {}
    for label, (process, out) in running.items():
        process.wait(timeout=PROCESS_TIMEOUT)
        results[label] = subprocess.CompletedProcess(process.args, process.returncode, out.read_text(),
                                                     out.with_suffix(".err").read_text())
    return results


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Until ``path`` exists (the process wrote it), or the process ends."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    assert path.exists(), f"{path.name} was not written"


def importing(place: dict[str, Path], label: str, name: str, model: Path, *options: str):
    return start(place, label, "-m", "manage", "import", name, str(model), "--specs", str(place["specs"]), *options)


def building(place: dict[str, Path], label: str, model: str):
    return start(place, label, "build_mar.py", "--store", str(place["store"]), "--specs", str(place["specs"]),
                 "--model", model)


def imported_version(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[:result.stdout.index("\n}\n") + 2])["version"]


def assert_store_matches(store: Path, expected: dict[str, set[str]]) -> Manifest:
    """The manifest on disk holds exactly ``expected`` (model → versions), each entry's sha256 and size those of its
    archive, each archive the version its entry says and as readable as any new file; nothing half-written is left
    in the store."""
    manifest = Manifest(store)
    umask = os.umask(0)
    os.umask(umask)
    assert {model: set(versions) for model, versions in manifest.models.items()} == expected
    for entry in manifest.entries():
        archive = store / entry["archive"]
        assert entry["sha256"] == sha256_file(archive) and entry["size_bytes"] == archive.stat().st_size
        assert stat.S_IMODE(archive.stat().st_mode) == 0o666 & ~umask
        with zipfile.ZipFile(archive) as mar:
            model = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        assert (model["modelName"], model["modelVersion"]) == (entry["model"], entry["version"])
    assert stat.S_IMODE(manifest.path.stat().st_mode) == 0o666 & ~umask
    archives = {f"{model}_{version}.mar" for model, versions in expected.items() for version in versions}
    assert {p.name for p in store.iterdir() if not p.name.startswith(".")} == archives | {MANIFEST}
    assert [p.name for p in store.iterdir() if p.name.startswith(".") and p.suffix != ".lock"] == []
    return manifest


def test_two_imports_of_one_model_and_two_builds_at_once_keep_every_version(files, place):
    for name in ("digits_a", "digits_b"):
        (place["specs"] / f"{name}.yaml").write_text(yaml.safe_dump({**DIGITS_SPEC, "name": name}))
    running = {
        "import one": importing(place, "import_one", "twin", files.trained, "--labels", str(files.labels)),
        "import two": importing(place, "import_two", "twin", files.trained, "--labels", str(files.labels)),
        "build a": building(place, "build_a", "digits_a"),
        "build b": building(place, "build_b", "digits_b"),
    }
    results = finish(running)
    for label, result in results.items():
        assert result.returncode == 0, f"{label}: {result.stderr[-3000:]}"
    versions = sorted(imported_version(results[label]) for label in ("import one", "import two"))
    assert versions == ["1.0", "1.1"]  # numbered apart
    spec = load_spec(place["specs"] / "twin.yaml")
    assert list(spec.versions) == ["1.0", "1.1"] and spec.default_version == "1.0"
    assert sorted(p.name for p in place["specs"].iterdir()) == ["digits_a.yaml", "digits_b.yaml", "twin.yaml"]
    assert_store_matches(place["store"], {"twin": {"1.0", "1.1"}, "digits_a": {"1.0"}, "digits_b": {"1.0"}})


def test_a_failed_import_takes_back_only_its_own_version(files, place):
    """Two imports of a new model at once. The one refused by its MIN_ACCURACY creates the spec; the other starts
    then, and adds its version while the first builds: the first's version goes, the other's stays, its default."""
    refused = importing(place, "refused", "flaky", files.untrained, "--labels", str(files.labels), "--eval",
                        str(files.eval_dir), "--min-accuracy", "0.9")
    wait_for(place["specs"] / "flaky.yaml", refused[0])
    running = {"refused": refused, "kept": importing(place, "kept", "flaky", files.trained, "--labels",
                                                     str(files.labels))}
    results = finish(running)
    assert "under min_accuracy 0.9" in refusal_line(results["refused"])
    kept = imported_version(results["kept"])
    spec = load_spec(place["specs"] / "flaky.yaml")
    assert list(spec.versions) == [kept] and spec.default_version == kept
    assert spec.versions[kept].source["path"] == str(files.trained)
    assert_store_matches(place["store"], {"flaky": {kept}})


def plan_for(files: Files, model: Path, **options) -> tuple[Request, Plan]:
    request = Request(name="twin", source=model.resolve(), labels=files.labels, **options)
    return request, plan_import(request)


def test_withdrawing_a_version_keeps_the_versions_added_after_it(files, place):
    """The rollback itself, step by step: each import's block comes out alone, whichever was written first."""
    specs = place["specs"]
    first = write_spec(*plan_for(files, files.trained), specs)
    second = write_spec(*plan_for(files, files.untrained), specs)
    third = write_spec(*plan_for(files, files.trained), specs)
    assert (first.version, second.version, third.version) == ("1.0", "1.1", "1.2")
    withdraw(second)  # added in the middle: 1.0 and 1.2 stay, as written
    spec = load_spec(specs / "twin.yaml")
    assert list(spec.versions) == ["1.0", "1.2"] and spec.default_version == "1.0"
    withdraw(first)  # the one that created the spec: the model stays with 1.2, now its default
    spec = load_spec(specs / "twin.yaml")
    assert list(spec.versions) == ["1.2"] and spec.default_version == "1.2"
    assert spec.versions["1.2"].source["path"] == str(files.trained)
    withdraw(third)  # the last version: nothing of the model is left
    assert list(specs.iterdir()) == []


def test_a_spec_that_would_not_load_is_never_written(files, place):
    """--min-accuracy 90 (a percentage where a fraction is meant) makes a spec the build would refuse: refused
    before it replaces the spec file, which stays as it was."""
    specs = place["specs"]
    write_spec(*plan_for(files, files.trained), specs)
    before = (specs / "twin.yaml").read_text()
    with pytest.raises(Refused, match="min_accuracy 90.0 must be a number from 0 to 1"):
        write_spec(*plan_for(files, files.trained, eval=files.eval_dir, min_accuracy=90.0), specs)
    assert (specs / "twin.yaml").read_text() == before and sorted(p.name for p in specs.iterdir()) == ["twin.yaml"]


@pytest.mark.parametrize("name, version, message", [
    ("../x", None, "model name '../x' must be 1 to 64 letters"),
    ("x`id`", None, "model name 'x`id`' must be 1 to 64 letters"),
    ("twin", '1.1": {}\n"2.0', "must be one to four numbers joined by dots"),
])
def test_a_name_or_version_that_breaks_the_rule_is_refused_before_anything_is_written(files, place, name, version,
                                                                                        message):
    result = subprocess.run([sys.executable, "-m", "manage", "import", name, str(files.trained), "--labels",
                             str(files.labels), "--specs", str(place["specs"]),
                             *(["--version", version] if version else [])],
                            cwd=REPO, env=env_of(place), capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert message in one_line_error(result)
    assert list(place["specs"].iterdir()) == [] and not place["store"].exists()
    assert not (place["specs"].parent / "x.yaml").exists()


def test_the_name_is_checked_before_from_is_read(place):
    result = subprocess.run([sys.executable, "-m", "manage", "import", "../x", str(place["home"] / "missing.pt"),
                             "--specs", str(place["specs"])], cwd=REPO, env=env_of(place), capture_output=True,
                            text=True, timeout=PROCESS_TIMEOUT)
    assert "model name '../x' must be" in one_line_error(result)


@pytest.mark.parametrize("args, message", [
    (["--model", "../digits"], "model name '../digits' must be"),
    (["--model", "digits", "--version", "2.0/../1.0"], "version '2.0/../1.0' must be"),
])
def test_build_refuses_a_model_or_version_that_breaks_the_rule(args, message, place, capsys):
    assert build_mar.main([*args, "--store", str(place["store"]), "--specs", str(place["specs"])]) == 1
    assert message in capsys.readouterr().err
    assert not place["store"].exists()
