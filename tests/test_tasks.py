"""Every image task from a user's own weights, as a user does it: a torchvision detector, a segmenter and a
multi-label ResNet-18 trained here on real photos with shapes pasted at known places (export/example_tasks.py), each
with its held-out set in the layout labelling tools export, imported with one ``make import``, served by a real
TorchServe started by serve.sh and asked through the front door.

Each answers as the eager model does on the user's own preprocessing (boxes within 1 pixel, class maps equal on
99.9 % of the pixels, probabilities within 1e-4), records its task's figures, and each gate refuses in one line.
A classifier whose labels are given in another order than it was trained is refused with the order found, and
imported with it when asked.
"""

from __future__ import annotations

import concurrent.futures
import copy
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from archives import load_spec
from archives.store import Manifest
from export.example_project import Project, crops, save
from serving.instance import Instance
from serving.torchserve import TorchServe
from tests.conftest import instance, make_import, ok, refusal_line, run_import

pytestmark = pytest.mark.integration

ORDER = ["rocket", "cat", "espresso"]  # the order a user trained the classifier in, not the folders' sorted order


@dataclass
class Tasks:
    env: dict[str, str]
    specs: Path
    front: str
    key: str
    projects: dict
    imports: dict[str, dict[str, str]]  # name → the make import variables it was imported with
    records: dict[str, dict]
    seconds: dict[str, float]

    def post(self, model: str, payload: bytes, query: str = "", version: str | None = None) -> requests.Response:
        path = f"/predictions/{model}" + (f"/{version}" if version else "") + (f"?{query}" if query else "")
        return requests.post(self.front + path, data=payload, timeout=60,
                             headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, detection_project, segmentation_project, multilabel_project) -> Tasks:
    """The three projects imported into a store of the module's own, then served (its environment set for the
    module only)."""
    home = tmp_path_factory.mktemp("tasks")
    specs = home / "specs"
    specs.mkdir()
    env = Instance.fresh(home / "serve", store=str(home / "store")).environment()
    detection, segmentation, multilabel = detection_project, segmentation_project, multilabel_project
    imports = {
        "shapes": {"FROM": detection.checkpoint, "ARCH": detection.arch,
                   "ARGS": json.dumps({k: v for k, v in detection.args.items() if k != "num_classes"}),
                   "EVAL": detection.eval_dir, "MIN_ACCURACY": 0.2},
        "regions": {"FROM": segmentation.checkpoint, "ARCH": segmentation.arch, "EVAL": segmentation.eval_dir,
                    "LABELS": segmentation.root / "labels.txt", "TRANSFORM": "train:eval_transform",
                    "MIN_ACCURACY": 0.3},
        "findings": {"FROM": multilabel.checkpoint, "ARCH": multilabel.arch, "TASK": "multilabel",
                     "EVAL": multilabel.eval_dir, "LABELS": multilabel.root / "labels.txt",
                     "TRANSFORM": "train:eval_transform", "MIN_ACCURACY": 0.7},
    }
    imports = {name: {"NAME": name, **{k: str(v) for k, v in variables.items()}} for name, variables in imports.items()}
    records, seconds = {}, {}

    def run(name: str) -> None:
        started = time.monotonic()
        output = ok(make_import(env, specs, imports[name]))
        seconds[name] = round(time.monotonic() - started, 1)
        records[name] = build_record(output)

    with concurrent.futures.ThreadPoolExecutor(len(imports)) as pool:  # three models: concurrent imports are safe (locks)
        for done in [pool.submit(run, name) for name in imports]:
            done.result()
    with instance(env):
        yield Tasks(env, specs, env["PROXY_ADDRESS"], TorchServe(Instance.current(env)).token("inference"),
                    {"shapes": detection, "regions": segmentation, "findings": multilabel}, imports, records, seconds)


def build_record(output: str) -> dict:
    """The build record an import prints (make echoes its command line first; a summary table follows)."""
    return json.loads(output[output.index("\n{") + 1:output.rindex("\n}") + 2])


def command_line(variables: dict[str, str]) -> list[str]:
    """``make import``'s variables as ``python -m manage import``'s arguments (its exit status is the import's)."""
    options = [item for key, value in variables.items() if key not in ("NAME", "FROM")
               for item in (f"--{key.lower().replace('_', '-')}", value)]
    return [variables["NAME"], variables["FROM"], *options]


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))


# --- detection ---------------------------------------------------------------------------------------------------


def eager_detections(model, path: Path, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torchvision.transforms.functional as F

    with torch.inference_mode():
        found = model([F.to_tensor(Image.open(path).convert("RGB"))])[0]
    keep = found["scores"] >= threshold
    return found["boxes"][keep].numpy(), found["labels"][keep].numpy(), found["scores"][keep].numpy()


def test_a_detector_imports_in_one_command_on_torchscript_with_its_map_recorded(tasks):
    record = tasks.records["shapes"]
    assert record["runtime"] == "torchscript" and "torch.export cannot capture" in record["runtime_reason"]
    assert record["export"]["method"] == "script"
    accuracy = record["accuracy"]
    assert accuracy["metric"] == "map50" and 0.2 <= accuracy["held_out"] <= 1 and accuracy["map"] <= accuracy["held_out"]
    # pycocotools on the served answers gives what it gave on the eager model's
    assert abs(accuracy["held_out"] - tasks.projects["shapes"].map50) <= 0.02, (accuracy, tasks.projects["shapes"].map50)
    assert record["parity"]["max_abs_diff"] <= 1.0  # pixels


def test_served_boxes_are_the_eager_models_within_a_pixel(tasks):
    project = tasks.projects["shapes"]
    compared = 0
    for path in image_files(project.eval_dir / "images"):
        answer = tasks.post("shapes", path.read_bytes(), "threshold=0.3").json()
        boxes, labels, scores = eager_detections(project.model, path, 0.3)
        assert len(answer["detections"]) == len(boxes), (path.name, answer, scores)
        order = np.argsort(-scores, kind="stable")
        for served, box, label, score in zip(answer["detections"], boxes[order], labels[order], scores[order]):
            assert np.abs(np.array(served["box"]) - box).max() <= 1.0
            assert served["label"] == project.labels[label] and abs(served["score"] - score) <= 1e-4
            compared += 1
        with Image.open(path) as image:
            assert (answer["width"], answer["height"]) == image.size
    assert compared >= 10


def test_detection_options_per_request_and_a_batch_of_mixed_sizes(tasks):
    project = tasks.projects["shapes"]
    paths = image_files(project.eval_dir / "images")
    alone = {path: tasks.post("shapes", path.read_bytes()).json() for path in paths[:6]}
    assert len({(a["width"], a["height"]) for a in alone.values()}) >= 3  # landscape, portrait, square
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # batchSize 4: batches mix the sizes
        together = dict(zip(paths[:6] * 2, pool.map(lambda p: tasks.post("shapes", p.read_bytes()).json(),
                                                    paths[:6] * 2)))
    assert together == alone
    one = tasks.post("shapes", paths[0].read_bytes(), "threshold=0&max_detections=1").json()
    assert len(one["detections"]) == 1
    refused = tasks.post("shapes", paths[0].read_bytes(), "threshold=1.5")
    assert refused.status_code == 400 and refused.json()["error"] == "bad_option"
    assert "threshold" in refused.json()["message"]


# --- segmentation ------------------------------------------------------------------------------------------------


def eager_classes(project, path: Path) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    with torch.inference_mode():
        scores = project.model(project.eval_transform()(image)[None])["out"][0]
    classes = Image.fromarray(scores.argmax(0).numpy().astype(np.uint8))
    return np.asarray(classes.resize(image.size, Image.Resampling.NEAREST))


def test_served_class_maps_are_the_eager_models_on_999_of_every_1000_pixels(tasks):
    project = tasks.projects["regions"]
    record = tasks.records["regions"]
    assert record["runtime"] == "onnxruntime" and record["accuracy"]["metric"] == "mean_iou"
    assert abs(record["accuracy"]["held_out"] - project.mean_iou) <= 0.02, (record["accuracy"], project.mean_iou)
    assert record["preprocessing_check"]["top1_agreement"] == 1.0
    for path in image_files(project.eval_dir / "images"):
        answer = tasks.post("regions", path.read_bytes())
        assert answer.headers["Content-Type"] == "image/png"
        served = np.asarray(Image.open(io.BytesIO(answer.content)))
        expected = eager_classes(project, path)
        assert served.shape == expected.shape and (served == expected).mean() >= 0.999, path.name
        shares = json.loads(answer.headers["X-Classes"])
        assert abs(sum(shares.values()) - 1) < 1e-3 and set(shares) <= set(project.labels)
        runs = tasks.post("regions", path.read_bytes(), "format=rle").json()["runs"]
        assert np.array_equal(np.repeat([c for c, _ in runs], [n for _, n in runs]).reshape(served.shape), served)


# --- multi-label -------------------------------------------------------------------------------------------------


def test_multilabel_answers_every_label_over_its_threshold_with_the_eager_probability(tasks):
    project = tasks.projects["findings"]
    record = tasks.records["findings"]
    accuracy = record["accuracy"]
    assert accuracy["metric"] == "macro_auroc" and accuracy["held_out"] >= 0.7 and 0 < accuracy["macro_f1"] <= 1
    assert abs(accuracy["held_out"] - project.macro_auroc) <= 0.02
    assert set(accuracy["thresholds"]) == set(project.labels)
    assert accuracy["thresholds_chosen"].startswith("to maximise")
    thresholds = accuracy["thresholds"]
    transform = project.eval_transform()
    images = sorted(p for p in project.eval_dir.parent.iterdir() if p.suffix == ".jpg")[:12]
    for path in images:
        with torch.inference_mode():
            probabilities = torch.sigmoid(project.model(transform(Image.open(path).convert("RGB"))[None]))[0]
        everything = tasks.post("findings", path.read_bytes(), "threshold=0").json()
        assert set(everything) == set(project.labels)
        for index, label in enumerate(project.labels):
            assert abs(everything[label] - float(probabilities[index])) <= 1e-4
        chosen = tasks.post("findings", path.read_bytes()).json()
        assert set(chosen) == {label for label in project.labels if everything[label] >= thresholds[label]}
        assert list(chosen.values()) == sorted(chosen.values(), reverse=True)


# --- every task ----------------------------------------------------------------------------------------------------


def test_the_open_inference_protocol_gives_each_tasks_outputs(tasks):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(tasks.front.removeprefix("http://"),
                                          network_timeout=120)
    headers = {"Authorization": f"Bearer {tasks.key}"}
    for model, project in tasks.projects.items():
        folder = project.eval_dir / "images" if (project.eval_dir / "images").is_dir() else project.eval_dir.parent
        paths = image_files(folder)[:2]
        payloads = [p.read_bytes() for p in paths]
        tensor = triton.InferInput("image", [len(payloads)], "BYTES")
        tensor.set_data_from_numpy(np.array(payloads, dtype=object), binary_data=True)
        result = client.infer(model, [tensor], headers=headers)
        answers = [tasks.post(model, payload).json() if model != "regions" else None for payload in payloads]
        if model == "shapes":
            counts = result.as_numpy("count")
            assert counts.tolist() == [len(a["detections"]) for a in answers]
            boxes = result.as_numpy("boxes")
            for row, answer in zip(boxes, answers):
                assert np.allclose(row[:len(answer["detections"])], [d["box"] for d in answer["detections"]],
                                   atol=0.01)
        elif model == "findings":
            assert result.as_numpy("count").tolist() == [len(a) for a in answers]
        else:
            sizes = result.as_numpy("size").tolist()
            assert sizes == [list(Image.open(p).size) for p in paths]


def test_each_gate_refuses_in_one_line(tasks):
    metrics = {"shapes": "map50", "regions": "mean_iou", "findings": "macro_auroc"}
    versions = {name: load_spec(tasks.specs / f"{name}.yaml").versions.keys() for name in metrics}
    with concurrent.futures.ThreadPoolExecutor(len(metrics)) as pool:  # imports may run at once
        results = dict(zip(metrics, pool.map(lambda name: run_import(tasks.env, tasks.specs, *command_line(
            {**tasks.imports[name], "MIN_ACCURACY": "0.999"})), metrics)))
    for name, metric in metrics.items():
        line = refusal_line(results[name])
        # refused on the eager model, before the export
        assert f"refused: {metric}" in line and "under min_accuracy 0.999 (eager model)" in line, line
        assert load_spec(tasks.specs / f"{name}.yaml").versions.keys() == versions[name]


# --- labels in the order the model was trained --------------------------------------------------------------------


def test_a_multilabel_model_given_the_csvs_sorted_names_is_refused_with_the_order_it_was_trained_in(tasks):
    """Without LABELS, a multi-label model's labels are the CSV's names, sorted: not the order it was trained in."""
    variables = {key: value for key, value in tasks.imports["findings"].items() if key != "LABELS"}
    line = refusal_line(run_import(tasks.env, tasks.specs, *command_line({**variables, "NAME": "sorted_findings"})))
    assert "another order" in line and f"Order found: {tasks.projects['findings'].labels}" in line, line
    assert not (tasks.specs / "sorted_findings.yaml").exists()



def test_labels_in_another_order_than_trained_are_refused_and_the_found_order_is_taken_when_asked(tasks, project:
                                                                                                    Project, tmp_path):
    """The user trained with their classes in their own order (ORDER); the EVAL folders' sorted names give another.
    A ResNet-18 with its outputs in that order is the project's with its head's rows permuted."""
    model = project.resnet
    mine = copy.deepcopy(model)
    rows = [project.labels.index(name) for name in ORDER]
    with torch.no_grad():
        mine.fc.weight.copy_(model.fc.weight[rows])
        mine.fc.bias.copy_(model.fc.bias[rows])
    torch.save(mine.state_dict(), tmp_path / "ordered.pth")
    for index, name in enumerate(project.labels):
        (tmp_path / "val" / name).mkdir(parents=True)
        for number, image in enumerate(crops({"cat": "chelsea", "espresso": "coffee", "rocket": "rocket"}[name],
                                             20, seed=300 + index)):
            save(image, tmp_path / "val" / name / f"{number}", "RGB")
    variables = {"NAME": "ordered", "FROM": str(tmp_path / "ordered.pth"), "ARCH": "torchvision:resnet18",
                 "EVAL": str(tmp_path / "val"), "TRANSFORM": "train:eval_transform", "CODE": str(project.root)}
    line = refusal_line(run_import(tasks.env, tasks.specs, *command_line(variables)))
    assert "another order" in line and f"Order found: {ORDER}" in line and "LABEL_ORDER=found" in line, line
    assert not (tasks.specs / "ordered.yaml").exists()
    output = ok(make_import(tasks.env, tasks.specs, {**variables, "LABEL_ORDER": "found"}))
    record = build_record(output)
    assert load_spec(tasks.specs / "ordered.yaml").versions["1.0"].labels == ORDER
    assert record["accuracy"]["held_out"] >= 0.8 and record["accuracy"]["label_order"]["given_score"] >= 0.8
    assert abs(record["accuracy"]["eager"] - record["accuracy"]["held_out"]) <= 0.02  # before and after the export
    transform = project.code.eval_transform()
    for path in sorted((tmp_path / "val" / "cat").iterdir())[:5]:
        with torch.inference_mode():
            top = int(mine(transform(Image.open(path).convert("RGB"))[None]).argmax())
        answer = tasks.post("ordered", path.read_bytes()).json()
        assert next(iter(answer)) == ORDER[top]
    shutil.rmtree(tmp_path / "val")
    assert Manifest(Path(tasks.env["MODEL_STORE"])).get("ordered", "1.0")
