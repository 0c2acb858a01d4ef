"""Build tests: real training, real TorchScript export, real torch-model-archiver, in a temporary store."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import build_mar
from archives import load_spec
from archives.store import UNPACKED_STAMP, Manifest, sha256_file
from export.samples import encode
from export.sources import SOURCES, Built, Source

SPEC = {
    "name": "tinydigits",
    "handler": "image_classifier",
    "default_version": "1.0",
    "versions": {"1.0": {"source": {"type": "digits_cnn", "epochs": 1, "learning_rate": 0.002}}},
    "model_config": {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 10,
        "handler": {"color_mode": "L", "resize": 8, "crop": 8, "mean": [0.0], "std": [1.0], "top_k": 3},
    },
}


def write_spec(directory: Path, spec: dict) -> Path:
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def built(tmp_path: Path, store: Manifest):
    spec = load_spec(write_spec(tmp_path, SPEC)).versions["1.0"]
    return spec, build_mar.build_version(spec, store)


def test_archive_holds_model_handlers_labels_config_and_build_record(built, store):
    spec, entry = built
    archive = store.store / "tinydigits_1.0.mar"
    with zipfile.ZipFile(archive) as mar:
        names = set(mar.namelist())
        mar_manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        info = json.loads(mar.read("model_info.json"))
        config = yaml.safe_load(mar.read("model-config.yaml"))
        labels = json.loads(mar.read("index_to_name.json"))
    assert {"model.pt", "image_classifier.py", "handlers/base.py", "handlers/vision.py", "index_to_name.json",
            "model_info.json", "model-config.yaml"} <= names
    assert not any("__pycache__" in name for name in names)
    assert mar_manifest["model"]["modelName"] == "tinydigits" and mar_manifest["model"]["modelVersion"] == "1.0"
    assert config == spec.model_config
    assert labels == {str(d): str(d) for d in range(10)}
    assert info["accuracy"] == entry["accuracy"] and info["parity"] == entry["parity"]
    assert 0.0 < entry["accuracy"]["held_out"] <= 1.0 and entry["accuracy"]["samples"] == 360
    assert entry["parity"]["max_abs_diff"] <= 1e-4
    assert entry["sha256"] == sha256_file(archive) and entry["size_bytes"] == archive.stat().st_size
    assert Manifest(store.store).get("tinydigits", "1.0") == entry  # written to disk


def test_a_build_keeps_out_of_another_builds_staging_of_the_same_model(tmp_path, store):
    """torch-model-archiver stages in ``<temp>/<model name>`` and deletes that folder: two builds of one model at
    once (two imports, numbered apart) shipped an archive without its handler. Each build stages in its own folder."""
    theirs = Path(tempfile.gettempdir()) / SPEC["name"]
    theirs.mkdir(exist_ok=True)
    (theirs / "image_classifier.py").write_text("# another build's staged handler\n")
    try:
        spec = load_spec(write_spec(tmp_path, SPEC)).versions["1.0"]
        build_mar.build_version(spec, store)
        assert (theirs / "image_classifier.py").read_text() == "# another build's staged handler\n"
    finally:
        shutil.rmtree(theirs)
    assert tempfile.gettempdir() == str(theirs.parent)  # the process's temp folder is restored


def test_rebuilding_unchanged_input_is_a_noop(built, store):
    spec, entry = built
    archive = store.store / spec.archive_name
    mtime = archive.stat().st_mtime_ns
    assert build_mar.build_version(spec, store) == entry
    assert archive.stat().st_mtime_ns == mtime and sha256_file(archive) == entry["sha256"]


def test_changed_input_for_a_built_version_is_refused_unless_forced(built, store, tmp_path):
    _, entry = built
    changed = {**SPEC, "versions": {"1.0": {"source": {**SPEC["versions"]["1.0"]["source"], "epochs": 2}}}}
    spec = load_spec(write_spec(tmp_path, changed)).versions["1.0"]
    with pytest.raises(build_mar.BuildError, match="immutable"):
        build_mar.build_version(spec, store)
    assert store.get("tinydigits", "1.0") == entry
    forced = build_mar.build_version(spec, store, force=True)
    assert forced["input_fingerprint"] != entry["input_fingerprint"] and forced["sha256"] != entry["sha256"]


def test_altered_archive_is_refused(built, store):
    spec, _ = built
    archive = store.store / spec.archive_name
    with open(archive, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(build_mar.BuildError, match="altered"):
        build_mar.build_version(spec, store)
    with pytest.raises(ValueError, match="altered"):
        store.verify("tinydigits", "1.0")


def test_a_sealed_store_serves_its_verified_folders_without_the_archives(built, store):
    """The serving image's store: unpacked from verified archives, then the archives left out. A folder is served
    while its stamp names the manifest's sha256, and refused once it was unpacked from another archive."""
    spec, entry = built
    folder = store.unpacked("tinydigits", "1.0")
    (store.store / spec.archive_name).unlink()
    assert store.unpacked("tinydigits", "1.0") == folder
    (folder / UNPACKED_STAMP).write_text("0" * 64)
    with pytest.raises(ValueError, match="is missing"):
        store.unpacked("tinydigits", "1.0")


class BrightnessSwitch(torch.nn.Module):
    """Data-dependent control flow: tracing bakes in the branch of the example, so the export is wrong."""

    def forward(self, x):
        features = x.mean(dim=(2, 3)).repeat(1, 10)
        if x.mean() > 0.5:
            return features
        return -features


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning")
def test_parity_failure_refuses_to_archive_and_names_the_input(tmp_path, store, monkeypatch):
    def build(preprocess, **params):
        bright, dark = np.full((8, 8), 255, np.uint8), np.zeros((8, 8), np.uint8)
        dark[0, 0] = 40
        samples = {"bright": encode(bright, "PNG"), "bright again": encode(bright, "PNG"), "dark": encode(dark, "PNG")}
        return Built(BrightnessSwitch(), "test", {str(d): str(d) for d in range(10)}, samples)

    monkeypatch.setitem(SOURCES, "brightness", Source(lambda: "brightness switch", build))
    spec = load_spec(write_spec(tmp_path, {**SPEC, "versions": {"1.0": {"source": {"type": "brightness"}}}}))
    with pytest.raises(build_mar.BuildError, match=r"dark \(batch of 1\).*max \|exported - eager\| = 0\.0\d+ > "
                                                   r"tolerance 0\.0001"):
        build_mar.build_version(spec.versions["1.0"], store)
    assert not (store.store / "tinydigits_1.0.mar").exists() and store.get("tinydigits", "1.0") is None


def test_cli_names_unknown_models_and_versions(capsys):
    assert build_mar.main(["--model", "nosuch"]) == 1
    assert "no spec for model 'nosuch'" in capsys.readouterr().err
    assert build_mar.main(["--model", "digits", "--version", "9.9"]) == 1
    assert "digits has no version '9.9'" in capsys.readouterr().err


def test_spec_errors_name_the_file_and_the_problem(tmp_path):
    from archives import SpecError

    for broken, message in (({**SPEC, "default_version": "2.0"}, "default_version '2.0' is not one of"),
                            ({**SPEC, "versions": {1.0: SPEC["versions"]["1.0"]}}, "quoted in YAML"),
                            ({**SPEC, "handler": "nosuch"}, "not a module in handlers/"),
                            ({**SPEC, "extra": 1}, "unknown keys \\['extra'\\]")):
        with pytest.raises(SpecError, match=message):
            load_spec(write_spec(tmp_path, broken))


@pytest.mark.parametrize("change, message", [
    ({"batchsize": 8}, "version 1.0: model_config: TorchServe does not read \\['batchsize'\\]"),
    ({"maxBatchDelay": 0}, "model_config.maxBatchDelay: 0 with batchSize 4: TorchServe reads 0 as unset and waits its "
                           "default 100 ms"),
    ({"batchSize": 0}, "model_config.batchSize: 0 is not a whole number from 1"),
    ({"responseTimeout": "30s"}, "model_config.responseTimeout: '30s' is not a whole number"),
    ({"minWorkers": 3}, "model_config.minWorkers: 3 is above maxWorkers 1"),
])
def test_server_settings_torchserve_would_not_serve_as_written_are_refused_by_key(tmp_path, change, message):
    from archives import SpecError

    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, {**SPEC, "model_config": {**SPEC["model_config"], **change}}))
    # batches of one may wait 0 ms: there is nothing to fill
    batchless = {**SPEC["model_config"], "batchSize": 1, "maxBatchDelay": 0}
    assert load_spec(write_spec(tmp_path, {**SPEC, "model_config": batchless})).versions["1.0"].model_config == batchless
