"""Runtimes: ONNX export refusals at build time, and one model served on TorchScript and on ONNX Runtime through a
real TorchServe answering alike, directly and through an A/B split between the two."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import build_mar
from archives import SpecError, load_spec
from archives.store import store_of
from export import onnx as onnx_export
from export.samples import SENTENCES
from export.sources import SOURCES, Source
from handlers.image_classifier import ImageClassifier
from handlers.runtime import OnnxModel
from serving.instance import Instance
from serving.torchserve import TorchServe
from tests.conftest import instance, loads_torch, manage, ok, ready_pids
from tests.test_build import SPEC, BrightnessSwitch, write_spec

ONNX_SPEC = {**SPEC, "versions": {"1.0": {**SPEC["versions"]["1.0"], "runtime": "onnxruntime"}}}
TOLERANCE = 1e-4  # the parity budget


def build(tmp_path: Path, store, spec: dict = ONNX_SPEC) -> dict:
    return build_mar.build_version(load_spec(write_spec(tmp_path, spec)).versions["1.0"], store)


def test_an_onnx_version_ships_the_onnx_file_and_runs_on_it(tmp_path, store):
    entry = build(tmp_path, store)
    assert entry["runtime"] == "onnxruntime" and entry["parity"]["max_abs_diff"] <= TOLERANCE
    with zipfile.ZipFile(store.store / entry["archive"]) as mar:
        names = set(mar.namelist())
        assert "model.onnx" in names and "MAR-INF/MANIFEST.json" in names
        assert "model.pt" in names  # this handler explains: explanations run on TorchScript
        assert b'"serializedFile": "model.onnx"' in mar.read("MAR-INF/MANIFEST.json")


def test_onnx_session_takes_its_threads_from_the_handler_settings(tmp_path, store):
    entry = build(tmp_path, store)
    with zipfile.ZipFile(store.store / entry["archive"]) as mar:
        mar.extract("model.onnx", tmp_path)
    model = OnnxModel(tmp_path / "model.onnx", "cpu", threads=1)
    assert model.session.get_session_options().intra_op_num_threads == 1
    outputs = model(np.zeros((3, 1, 8, 8), np.float32))
    assert isinstance(outputs, np.ndarray) and outputs.shape == (3, 10)
    with pytest.raises(TypeError, match="takes 1 inputs"):
        model(np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.float32))


def test_openvino_runs_the_same_onnx_file_with_the_same_answers(tmp_path, store):
    """The candidate runtime ``make bench-runtimes`` measures (``load_test/openvino_runtime.py``) on a built
    version's own model.onnx: the handler's forward gives what ONNX Runtime gives, at two batch sizes (its shapes
    are dynamic), and a wrong input count is named."""
    from load_test import openvino_runtime

    entry = build(tmp_path, store)
    with zipfile.ZipFile(store.store / entry["archive"]) as mar:
        mar.extract("model.onnx", tmp_path)
    reference = OnnxModel(tmp_path / "model.onnx", "cpu", threads=1)
    candidate = openvino_runtime.OpenVinoModel(tmp_path / "model.onnx", threads=1)
    handler = ImageClassifier.from_config({"handler": {"resize": 8, "crop": 8, "mean": [0.5], "std": [0.5],
                                                       "color_mode": "L"}})
    for batch in (1, 3):
        inputs = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
        assert candidate(inputs).shape == (batch, 10)
        assert openvino_runtime.parity(handler, reference, candidate, inputs) < TOLERANCE
    with pytest.raises(TypeError, match="takes 1 inputs"):
        candidate(inputs, inputs)


def test_a_fixed_batch_axis_is_refused_naming_the_batch_it_cannot_run(tmp_path, store, monkeypatch):
    monkeypatch.setattr(ImageClassifier, "DYNAMIC_AXES", ((),))  # a layer that forgot to declare its batch axis
    with pytest.raises(build_mar.BuildError, match=r"onnxruntime: parity check failed on .* \(batch of 1\): the "
                                                   r"exported model cannot run it: .*invalid dimensions for input"):
        build(tmp_path, store)
    assert store.get("tinydigits", "1.0") is None


def test_an_export_that_differs_from_eager_is_refused(tmp_path, store, monkeypatch):
    exporter = onnx_export.export_onnx

    def drifting(model, args, path, dynamic_axes):  # an exporter bug: the graph's weights are not the model's
        drifted = type(model)()
        drifted.load_state_dict({k: v + 1e-3 for k, v in model.state_dict().items()})
        return exporter(drifted.eval(), args, path, dynamic_axes)

    monkeypatch.setattr(build_mar, "export_onnx", drifting)
    with pytest.raises(build_mar.BuildError, match=r"onnxruntime: parity check failed on .* \(batch of 1\): "
                                                   r"max \|exported - eager\| = .* > tolerance \S+( \(0\.0001 x the "
                                                   r"largest output, \S+\))?$"):
        build(tmp_path, store)
    assert not (store.store / "tinydigits_1.0.mar").exists()


def test_data_dependent_control_flow_is_refused_by_the_onnx_export(tmp_path, store, monkeypatch):
    digits_source = SOURCES["digits_cnn"]

    def switch(preprocess, **params):  # scripted TorchScript keeps the branch; torch.export cannot capture it
        built = digits_source.build(preprocess, **params)
        built.model = BrightnessSwitch()
        return built

    monkeypatch.setitem(SOURCES, "switch", Source(lambda **params: "switch", switch))
    spec = {**ONNX_SPEC, "export": {"method": "script"},
            "versions": {"1.0": {"source": {"type": "switch", "epochs": 1, "learning_rate": 0.002},
                                 "runtime": "onnxruntime"}}}
    with pytest.raises(build_mar.BuildError, match="torch.export could not capture the model for ONNX"):
        build(tmp_path, store, spec)


def test_an_unknown_runtime_is_a_spec_error(tmp_path):
    spec = {**SPEC, "versions": {"1.0": {**SPEC["versions"]["1.0"], "runtime": "tensorrt"}}}
    with pytest.raises(SpecError, match="runtime 'tensorrt' is not one of torchscript, onnxruntime"):
        load_spec(write_spec(tmp_path, spec))


def test_fast_decoding_on_onnx_runtime_agrees_with_the_reference_preprocessing_on_real_photos():
    """Top-1 on the built ONNX version: the served path (JPEG draft decoding, resize on uint8) against torchvision's
    usual pipeline on the fully decoded photo, over 18 real photos from 213 to 1600 pixels on a side."""
    from torchvision import transforms as T

    from archives.store import Manifest
    from load_test import inputs, limit

    archive, _ = Manifest().verify("efficientnet_lite0", "1.1")
    handler, model = limit.load_pipeline(archive, threads=1)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(handler.settings["mean"], handler.settings["std"])])
    photos = inputs.photos()
    served = model(handler.collate([handler.decode(body) for body in photos.values()])).argmax(axis=1)
    expected = model(torch.stack([reference(Image.open(io.BytesIO(body)).convert("RGB"))
                                  for body in photos.values()]).numpy()).argmax(axis=1)
    disagree = [name for name, a, b in zip(photos, served.tolist(), expected.tolist()) if a != b]
    assert not disagree, disagree


# --- served: efficientnet_lite0 1.0 (TorchScript) and 1.1 (ONNX Runtime), minilm 1.0 and 1.1 --------------------

IMAGE_VERSIONS = {"1.0": "torchscript", "1.1": "onnxruntime"}


def classify(served, payload: bytes, version: str) -> dict[str, float]:
    response = served.client.predict("efficientnet_lite0", payload, version=version)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == version, response.text
    return response.json()


@pytest.mark.integration
def test_both_runtimes_answer_alike_on_real_photos(served, photos):
    for name, payload in photos.items():
        answers = {version: classify(served, payload, version) for version in IMAGE_VERSIONS}
        torchscript, onnxruntime = answers["1.0"], answers["1.1"]
        assert list(torchscript)[0] == list(onnxruntime)[0], name
        shared = torchscript.keys() & onnxruntime.keys()
        assert len(shared) >= 4 and all(abs(torchscript[k] - onnxruntime[k]) < TOLERANCE for k in shared), name


@pytest.mark.integration
def test_both_runtimes_embed_alike(served):
    texts = [SENTENCES[name] for name in ("cat", "markets", "launch")]
    vectors = {}
    for version in ("1.0", "1.1"):
        response = served.client.request("inference", "POST", f"/predictions/minilm/{version}", json={"texts": texts})
        assert response.headers["X-Model-Version"] == version
        vectors[version] = np.array(response.json()["embeddings"])
    assert np.abs(vectors["1.0"] - vectors["1.1"]).max() < 1e-5


@pytest.mark.integration
def test_the_onnx_version_explains_on_its_torchscript_copy(served, photos):
    response = served.client.request("inference", "POST", "/explanations/efficientnet_lite0/1.1",
                                     data=photos["chelsea"], ok=tuple(range(200, 600)))
    assert response.status_code == 200, response.text
    assert "cat" in response.json()["class"] and response.headers["X-Model-Version"] == "1.1"


@pytest.mark.integration
def test_an_ab_split_between_torchscript_and_onnx_runtime(served, photos, restored):
    ok(manage("ab", "efficientnet_lite0", "1.0=50", "1.1=50"))
    expected = {name: classify(served, payload, "1.0") for name, payload in photos.items()}
    headers = {"Authorization": f"Bearer {served.client.token('inference')}"}
    url = f"{served.env['PROXY_ADDRESS']}/predictions/efficientnet_lite0"
    jobs = [name for name in photos for _ in range(4)]

    def one(name: str) -> str:
        response = requests.post(url, data=photos[name], headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert list(answer)[0] == list(expected[name])[0], (name, response.headers["X-Model-Version"])
        return response.headers["X-Model-Version"]

    with ThreadPoolExecutor(4) as pool:
        versions = Counter(pool.map(one, jobs))
    assert versions.keys() == set(IMAGE_VERSIONS), versions
    print(f"A/B TorchScript 1.0 / ONNX Runtime 1.1, 50/50 over {len(jobs)} photos: {dict(versions)}")


@pytest.mark.integration
def test_onnx_runtime_workers_never_import_torch_until_they_explain(tmp_path, photos):
    """A TorchServe of one ONNX Runtime version: after predictions (every photo, in batches) no worker process has
    torch loaded (TorchServe's worker module imports it at its top; handlers/site defers it); an explanation, which
    needs torch's gradients, loads it in the worker that explains, and only there."""
    store = store_of(tmp_path / "store", [("efficientnet_lite0", "1.1")])
    with instance(Instance.fresh(tmp_path / "serve", store=str(store)).environment()):
        client = TorchServe()
        pids = ready_pids(client, "efficientnet_lite0", "1.1")
        assert len(pids) == 2
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda payload: client.predict("efficientnet_lite0", payload),
                                    list(photos.values()) * 3))
        assert all(answer.status_code == 200 and answer.json() for answer in answers)
        assert [loads_torch(pid) for pid in pids] == [False, False]
        response = client.request("inference", "POST", "/explanations/efficientnet_lite0", data=photos["chelsea"])
        assert "cat" in response.json()["class"]
        assert sorted(loads_torch(pid) for pid in pids) == [False, True]
        assert ready_pids(client, "efficientnet_lite0", "1.1") == pids
