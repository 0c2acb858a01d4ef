"""INT8 versions gated on the user's own data (export/quantize.py), as a user makes them: the ResNet-18 trained in the
test session (the ``project`` fixture) imported with ``make import ... QUANTIZE=int8``, which builds its fp32 version
1.0 and its INT8 version 1.1 (static, calibrated on the user's EVAL folder through the served preprocessing), gated
against 1.0 on that folder; a calibration of blank images is refused by the gate with its figures (all-black ones
are not: this ResNet keeps its top-1 on every eval photo with them, scores moved, see export/quantize.py); the INT8
version is served by a TorchServe of its own behind the front door, answers the eval photos with fp32's top-1, as
/predictions and the v2 protocol alike, from workers that never import torch.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import requests
import yaml
from PIL import Image

from archives import SpecError, load_spec, load_specs
from archives.store import Manifest
from export.example_project import Project
from serving.instance import Instance
from serving.torchserve import TorchServe
from tests.conftest import REPO, instance, loads_torch, make_import, manage, ok, one_line_error, ready_pids

pytestmark = pytest.mark.integration


@dataclass
class Quantized:
    env: dict[str, str]
    specs: Path
    store: Manifest
    home: Path
    output: str


def make_quantize(env: dict[str, str], specs: Path, variables: dict[str, str]):
    """``make quantize`` with these variables, as ``make_import`` runs ``make import``."""
    return subprocess.run(["make", "--no-print-directory", "quantize", f"SPECS={specs}",
                           *(f"{key}={value}" for key, value in variables.items())],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=900)


def make_refusal(result: subprocess.CompletedProcess) -> str:
    """The one error line of a make target whose command refused (make itself then exits 2 and says so)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def quantized(project: Project, tmp_path_factory) -> Quantized:
    """The user's ResNet-18 imported with QUANTIZE=int8 into a store and a folder of specs of the test's own."""
    home = tmp_path_factory.mktemp("quantize")
    specs = home / "specs"
    specs.mkdir()
    env = Instance.fresh(home, store=str(home / "store")).environment()
    output = ok(make_import(env, specs, {"NAME": "photos", "FROM": str(project.root / "resnet18.pth"),
                                         "ARCH": "torchvision:resnet18", "EVAL": str(project.eval_dir),
                                         "TRANSFORM": "train:eval_transform", "CODE": str(project.root),
                                         "QUANTIZE": "int8"}))
    return Quantized(env, specs, Manifest(home / "store"), home, output)


def eval_photos(project: Project) -> list[Path]:
    return [path for label in project.labels for path in sorted((project.eval_dir / label).iterdir())]


def test_the_int8_version_passes_its_gate_and_records_both_versions_figures(quantized):
    spec = load_specs(quantized.specs)["photos"]
    assert spec.default_version == "1.0" and list(spec.versions) == ["1.0", "1.1"]
    int8 = spec.versions["1.1"]
    assert int8.quantize == {"version": "1.0", "mode": "static", "max_drop": 0.01, "min_agreement": 0.98,
                             "min_cosine": 0.99}
    assert int8.runtime == "onnxruntime" and int8.eval == spec.versions["1.0"].eval
    fp32_entry, entry = quantized.store.get("photos", "1.0"), quantized.store.get("photos", "1.1")
    record = entry["quantization"]
    assert record["from_version"] == "1.0" and record["mode"] == "static" and record["format"] == "QDQ"
    assert record["per_channel"] and record["calibration"]["samples"] == 18
    assert len(record["calibration"]["sha256"]) == 64 and record["calibration"]["name"].endswith("val")
    # both versions measured on the same held-out set, in one run: the figures are the recorded accuracies
    assert record["eval_set"]["sha256"] == fp32_entry["accuracy"]["eval_set"]["sha256"]
    assert record["fp32"] == fp32_entry["accuracy"]["held_out"] and record["int8"] == entry["accuracy"]["held_out"]
    assert record["drop"] == pytest.approx(record["fp32"] - record["int8"]) and record["drop"] <= 0.01
    assert record["agreement"] >= record["min_allowed"] == 0.98 and record["samples"] == 18
    assert 0 <= record["tie_gap"] <= 1 and (record["tie_gap"] == 0) == (record["agreeing"] == 18)
    assert record["size_bytes"]["int8"] < 0.3 * record["size_bytes"]["fp32"]
    speed = record["speed"]
    assert speed["batch"] == 4 and speed["fp32"] > 0 and speed["int8"] > 0 and speed["speedup"] > 0
    with zipfile.ZipFile(quantized.store.store / entry["archive"]) as mar:
        graph = onnx.load_from_string(mar.read("model.onnx")).graph
        assert json.loads(mar.read("model_info.json"))["quantization"] == record
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {node.op_type for node in graph.node}
    assert record["score_shift"]["max"] < 0.2
    assert '"from_version": "1.0"' in quantized.output  # make import printed the INT8 version's record too


def test_a_broken_calibration_is_refused_by_the_gate_with_its_figures(quantized, tmp_path):
    blank = tmp_path / "blank images"
    blank.mkdir()
    for index in range(8):
        Image.new("RGB", (96, 96), (255, 255, 255)).save(blank / f"{index}.png")
    before = (quantized.specs / "photos.yaml").read_text()
    result = make_quantize(quantized.env, quantized.specs, {"MODEL": "photos", "VERSION": "1.0",
                                                            "CALIBRATION": str(blank)})
    line = make_refusal(result)
    assert "photos 1.2: refused: INT8 refused:" in line, line
    for figure in ("fp32 ", "int8 ", "drop ", "max_drop 0.01", "top-1 agreement ", "min_agreement 0.98"):
        assert figure in line, line
    assert (quantized.specs / "photos.yaml").read_text() == before  # withdrawn
    assert Manifest(quantized.store.store).get("photos", "1.2") is None
    assert not (quantized.store.store / "photos_1.2.mar").exists()


def test_quantize_refuses_what_it_cannot_quantize_in_one_line(quantized, tmp_path):
    from export.importer import Refused, quantize_version

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "super_resolution.yaml").write_text((REPO / "archives" / "super_resolution.yaml").read_text())
    line = one_line_error(manage("quantize", "super_resolution", "--specs", str(specs), **quantized.env))
    assert "quantize: super_resolution models are not quantized here" in line, line
    for args, gate, expected in ((("photos", "1.1"), {}, "photos 1.1 is already INT8: name its fp32 version"),
                                 (("photos", "7.0"), {}, "no such model, or no such version"),
                                 (("photos", None, 2.0), {}, "quantize: max_drop 2.0 must be a number from 0 to 1"),
                                 (("photos",), {"min_agreement": 1.5},
                                  "quantize: min_agreement 1.5 must be a number from 0 to 1")):
        with pytest.raises(Refused, match=expected):
            quantize_version(*args, specs_dir=quantized.specs, **gate)
    assert list(load_specs(quantized.specs)["photos"].versions) == ["1.0", "1.1"]


def test_spec_errors_name_the_file_the_version_and_the_field(tmp_path):
    base = {"name": "m", "handler": "image_classifier", "default_version": "1.0",
            "versions": {"1.0": {"source": {"type": "digits_cnn", "epochs": 1, "learning_rate": 0.1}}}}
    cases = {
        "quantize: needs source": {"source": {"type": "digits_cnn"}, "quantize": {}},
        "source: a version made from another says how": {"source": {"type": "version", "version": "1.0"}},
        "source: version '9.9' is not one of": {"source": {"type": "version", "version": "9.9"}, "quantize": {}},
        "quantize: mode 'int4' is not one of static, dynamic": {"source": {"type": "version", "version": "1.0"},
                                                                "quantize": {"mode": "int4"}},
        "quantize: max_drop 5 must be a number from 0 to 1": {"source": {"type": "version", "version": "1.0"},
                                                              "quantize": {"max_drop": 5}},
        "runtime: a quantized version is served on onnxruntime": {"source": {"type": "version", "version": "1.0"},
                                                                   "quantize": {}, "runtime": "torchscript"},
    }
    path = tmp_path / "m.yaml"
    for message, version in cases.items():
        path.write_text(yaml.safe_dump({**base, "versions": {**base["versions"], "1.1": version}}))
        with pytest.raises(SpecError) as error:
            load_spec(path)
        assert str(error.value).startswith(f"{path}: version 1.1: {message}"), str(error.value)


def test_the_int8_version_serves_fp32s_answers_through_the_front_door_and_v2_without_torch(quantized, project):
    photos = eval_photos(project)
    with instance(quantized.env):
        client = TorchServe()
        fp32 = [client.predict("photos", path.read_bytes(), "1.0") for path in photos]
        int8 = [client.predict("photos", path.read_bytes(), "1.1") for path in photos]
        assert all(r.status_code == 200 for r in fp32 + int8), [r.text for r in fp32 + int8 if r.status_code != 200]
        assert [next(iter(r.json())) for r in int8] == [next(iter(r.json())) for r in fp32]
        assert all(r.headers["X-Model-Version"] == "1.1" for r in int8)
        # the Open Inference Protocol (KServe v2) answers as /predictions does
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(photos[:6])],
                            "data": [base64.b64encode(path.read_bytes()).decode() for path in photos[:6]]}]}
        answer = requests.post(f"{client.inference_url}/v2/models/photos/versions/1.1/infer", json=body,
                               headers={"Authorization": f"Bearer {client.token('inference')}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
        k = len(int8[0].json())
        for index, response in enumerate(int8[:6]):
            expected = response.json()
            assert outputs["labels"][index * k:(index + 1) * k] == list(expected)
            assert outputs["scores"][index * k:(index + 1) * k] == pytest.approx(list(expected.values()), abs=1e-6)
        pids = ready_pids(client, "photos", "1.1")
        assert pids and not any(loads_torch(pid) for pid in pids)
