"""Held-out sets for detection, segmentation and multi-label models, and the figures each is gated on.

Real files written as labelling tools export them (JPEG and PNG images from Pillow, COCO JSON, palette and 16-bit
PNG masks, CSVs); the figures are checked against hand-computed values or against the library computing them.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from export.datasets import (DataError, DetectionSet, EvalSet, MultilabelSet, SegmentationSet, eval_kind, read_eval,
                             read_detection_eval, read_multilabel_eval, read_segmentation_eval)
from export.measures import (best_thresholds, confusion_matrix, detection_scores, label_order, multilabel_scores,
                             segmentation_scores)


def write_image(path, size=(64, 48), color=(200, 30, 30), kind="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, kind)
    return path


# --- detection -----------------------------------------------------------------------------------------------------

BOXES = {1: [(1, [4, 4, 20, 16]), (3, [30, 10, 25, 30])], 2: [(3, [10, 5, 40, 30])], 3: [(1, [0, 0, 32, 24])]}


def coco_json(root, mutate=None):
    images = [{"id": i, "file_name": f"img{i}.jpg", "width": 64, "height": 48} for i in BOXES]
    annotations = [{"id": 10 * i + n, "image_id": i, "category_id": c, "bbox": box}
                   for i, boxes in BOXES.items() for n, (c, box) in enumerate(boxes)]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}
    if mutate:
        mutate(data)
    (root / "annotations.json").write_text(json.dumps(data))


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "boxes"
    for i in BOXES:
        write_image(root / "images" / f"img{i}.jpg", color=(10 * i, 100, 200))
    coco_json(root)
    return root


def test_detection_set(coco_root):
    data = read_detection_eval(coco_root)
    assert isinstance(data, DetectionSet) and data.path == coco_root
    assert data.image_ids == [1, 2, 3] and data.sizes == [(64, 48)] * 3
    assert data.payloads == [(coco_root / "images" / f"img{i}.jpg").read_bytes() for i in BOXES]
    assert data.categories == {1: "cat", 3: "dog"}
    assert len(data.coco["annotations"]) == 4
    assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in data.coco["annotations"])
    assert isinstance(read_eval(coco_root, "detection"), DetectionSet) and eval_kind(coco_root) == "detection"


def test_detection_set_fills_in_what_tools_leave_out(coco_root):
    def strip(data):
        for image in data["images"]:
            del image["width"], image["height"]
        for annotation in data["annotations"]:
            del annotation["id"]
    coco_json(coco_root, strip)
    data = read_detection_eval(coco_root)
    assert data.sizes == [(64, 48)] * 3  # from the images' headers
    ids = [a["id"] for a in data.coco["annotations"]]
    assert len(set(ids)) == len(ids)


def _drop(key, index=0):
    return lambda data: data[key].pop(index)


def _set(key, field, value, index=0):
    return lambda data: data[key][index].__setitem__(field, value)


@pytest.mark.parametrize("mutate, message", [
    (_set("annotations", "bbox", [1, 2, 3]), "expected four numbers"),
    (_set("annotations", "bbox", [1, 2, "3", 4]), "expected four numbers"),
    (_set("annotations", "bbox", [1, 2, -3, 4]), "negative width or height"),
    (_set("annotations", "bbox", [50, 10, 20, 10]), "outside its 64×48 image 1"),
    (_set("annotations", "bbox", [4, -3, 10, 10]), "outside its 64×48 image 1"),
    (_set("images", "id", 2), "image id 2 is used twice"),
    (_set("annotations", "id", 20), "not a unique integer"),
    (_set("annotations", "image_id", 99), "names image 99, which is not among the listed images"),
    (_set("annotations", "category_id", 2), "names category 2, which is not among the listed categories"),
    (_set("categories", "id", 3), "category id 3 is used twice"),
    (_set("images", "file_name", "gone.jpg"), "image 1 (gone.jpg) is listed but"),
    (lambda data: data.update(images=[], annotations=[]), "holds no images"),
    (lambda data: data.update(annotations=[]), "holds no annotations"),
    (lambda data: data.pop("categories"), "is not COCO"),
])
def test_detection_set_refusals(coco_root, mutate, message):
    coco_json(coco_root, mutate)
    with pytest.raises(DataError, match="annotations.json|boxes") as error:
        read_detection_eval(coco_root)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_detection_set_missing_files(coco_root):
    (coco_root / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="annotations.json is not valid JSON"):
        read_detection_eval(coco_root)
    (coco_root / "annotations.json").unlink()
    with pytest.raises(DataError, match="has no annotations.json"):
        read_detection_eval(coco_root)
    coco_json(coco_root)
    for file in (coco_root / "images").iterdir():
        file.unlink()
    (coco_root / "images").rmdir()
    with pytest.raises(DataError, match="has no images/ folder"):
        read_detection_eval(coco_root)


def as_detections(data, shift=0.0, label_of=lambda category: category):
    """The ground truth as a model's output: xyxy boxes, shifted right by ``shift`` of their width."""
    found = []
    for image_id in data.image_ids:
        truth = [a for a in data.coco["annotations"] if a["image_id"] == image_id]
        boxes = [[x + shift * w, y, x + w + shift * w, y + h] for x, y, w, h in (a["bbox"] for a in truth)]
        found.append({"boxes": np.array(boxes), "labels": np.array([label_of(a["category_id"]) for a in truth]),
                      "scores": np.linspace(0.9, 0.5, len(truth))})
    return found


def test_detection_scores(coco_root):
    data = read_detection_eval(coco_root)
    perfect = detection_scores(data, as_detections(data))
    assert perfect["map"] == perfect["map50"] == perfect["map75"] == 1.0
    assert perfect["per_category_ap50"] == {"cat": 1.0, "dog": 1.0}
    assert perfect["images"] == 3 and perfect["detections"] == 4 and perfect["unmapped"] == 0

    shifted = detection_scores(data, as_detections(data, shift=0.2))  # IoU 0.67: right at 0.5, wrong at 0.75
    assert shifted["map50"] == 1.0 and shifted["map75"] == 0.0 and 0 < shifted["map"] < perfect["map"]

    nothing = detection_scores(data, [{"boxes": np.zeros((0, 4)), "labels": [], "scores": []}] * 3)
    assert nothing["map"] == nothing["map50"] == nothing["map75"] == 0.0 and nothing["detections"] == 0
    assert nothing["per_category_ap50"] == {"cat": 0.0, "dog": 0.0}

    # a model whose labels are 0 = cat, 1 = dog
    relabelled = as_detections(data, label_of={1: 0, 3: 1}.get)
    assert detection_scores(data, relabelled, category_of={0: 1, 1: 3})["map"] == 1.0
    swapped = detection_scores(data, relabelled, category_of={0: 3, 1: 1})
    assert swapped["map"] == 0.0
    unmapped = detection_scores(data, relabelled, category_of={0: 1})
    assert unmapped["unmapped"] == 2 and unmapped["per_category_ap50"] == {"cat": 1.0, "dog": 0.0}
    with pytest.raises(ValueError, match="one per image"):
        detection_scores(data, relabelled[:2])


# --- segmentation --------------------------------------------------------------------------------------------------

def write_mask(path, values, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.uint8), "L" if mode == "P" else None)
    if mode == "P":
        image = image.convert("P")
        image.putpalette([255 - v for v in range(256) for _ in range(3)])  # colours unlike the indices
    image.save(path, "PNG")
    return path


MASK = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [255, 255, 1, 1]])


@pytest.fixture
def seg_root(tmp_path):
    root = tmp_path / "seg"
    write_image(root / "images" / "a.jpg", size=(4, 3))
    write_image(root / "images" / "b.png", size=(4, 3), kind="PNG")
    write_image(root / "images" / "c.jpg", size=(4, 3))
    write_mask(root / "masks" / "a.png", MASK)
    write_mask(root / "masks" / "b.png", MASK, "P")
    write_mask(root / "masks" / "c.png", MASK * 100, "I;16")
    return root


def test_segmentation_set(seg_root):
    data = read_segmentation_eval(seg_root)
    assert isinstance(data, SegmentationSet) and data.names == ["a", "b", "c"]
    assert data.payloads[1] == (seg_root / "images" / "b.png").read_bytes()
    with Image.open(seg_root / "masks" / "b.png") as palette:
        assert palette.mode == "P"
    np.testing.assert_array_equal(data.masks[0], MASK)  # 255, "ignore", is kept
    np.testing.assert_array_equal(data.masks[1], MASK)  # indices, not the palette's colours
    np.testing.assert_array_equal(data.masks[2], MASK * 100)  # 16-bit
    assert all(m.shape == (3, 4) and np.issubdtype(m.dtype, np.integer) for m in data.masks)
    assert isinstance(read_eval(seg_root, "segmentation"), SegmentationSet) and eval_kind(seg_root) == "segmentation"


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "masks" / "b.png").unlink(), "no mask for b.png"),
    (lambda root: write_mask(root / "masks" / "d.png", MASK), "no image for d.png"),
    (lambda root: write_image(root / "masks" / "d.jpg"), "mask .*d.jpg is not a PNG"),
    (lambda root: write_image(root / "masks" / "a.png", size=(4, 3), kind="JPEG"), "is a JPEG, not a PNG"),
    (lambda root: write_image(root / "masks" / "a.png", size=(4, 3), kind="PNG"), "has mode RGB, not a single"),
    (lambda root: (root / "masks" / "a.png").write_bytes(b"not an image"), "is not an image Pillow can read"),
    (lambda root: write_mask(root / "masks" / "a.png", np.zeros((4, 4))), "a.jpg is 4×3 but its mask is 4×4"),
])
def test_segmentation_set_refusals(seg_root, change, message):
    change(seg_root)
    with pytest.raises(DataError, match=message) as error:
        read_segmentation_eval(seg_root)
    assert "\n" not in str(error.value)


def test_confusion_matrix():
    true = np.array([[0, 0, 1, 1], [2, 255, 1, 0], [7, 1, 1, 2]])
    predicted = np.array([[0, 1, 1, 1], [2, 0, 0, 0], [0, 9, 1, 0]])
    expected = np.array([[2, 1, 0], [1, 3, 0], [1, 0, 1]])  # 255 is ignored; 7 and 9 are not classes
    np.testing.assert_array_equal(confusion_matrix(true, predicted, 3, ignore=255), expected)
    assert confusion_matrix(true, predicted, 3).dtype == np.int64
    with pytest.raises(ValueError, match="must match"):
        confusion_matrix(true, predicted[:2], 3)

    rng = np.random.default_rng(0)
    true, predicted = rng.integers(0, 21, (2, 2_000_000), dtype=np.uint8)
    start = time.perf_counter()
    confusion = confusion_matrix(true, predicted, 21, ignore=255)
    assert time.perf_counter() - start < 1.0 and confusion.sum() == 2_000_000


def test_segmentation_scores():
    confusion = np.array([[3, 1, 0, 0], [2, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 5]])
    scores = segmentation_scores(confusion)
    # IoU = hits / (truth + predicted - hits); class 2 is neither true nor predicted anywhere
    assert scores["per_class_iou"] == [0.5, round(4 / 7, 6), None, 1.0]
    assert scores["mean_iou"] == round((0.5 + 4 / 7 + 1.0) / 3, 6)
    assert scores["pixel_accuracy"] == 0.8
    predicted_never_true = segmentation_scores(np.array([[1, 1], [0, 0]]))
    assert predicted_never_true["per_class_iou"] == [0.5, 0.0] and predicted_never_true["mean_iou"] == 0.25


# --- multi-label ---------------------------------------------------------------------------------------------------

def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tags_csv(tmp_path):
    for name in ("a.jpg", "b.jpg", "sub/c.png"):
        write_image(tmp_path / "pics" / name, kind="PNG" if name.endswith("png") else "JPEG")
    return write_csv(tmp_path / "tags.csv", "image,labels,source\npics/a.jpg,cat|dog,x\npics/b.jpg,,y\n"
                                            "pics/sub/c.png, bird | cat ,z\n")


LABELS = {"0": "cat", "1": "dog", "2": ["n01", "bird"], "3": "fish"}


def test_multilabel_set(tags_csv):
    data = read_multilabel_eval(tags_csv)
    assert isinstance(data, MultilabelSet)
    assert data.images == ["pics/a.jpg", "pics/b.jpg", "pics/sub/c.png"]
    assert data.labels == [["cat", "dog"], [], ["bird", "cat"]] and data.names == ["bird", "cat", "dog"]
    assert data.payloads[2] == (tags_csv.parent / "pics/sub/c.png").read_bytes()
    np.testing.assert_array_equal(data.targets(LABELS), [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert isinstance(read_eval(tags_csv, "multilabel"), MultilabelSet) and eval_kind(tags_csv) == "multilabel"
    with pytest.raises(DataError, match=r"the labels of .*tags.csv are not the model's labels: bird, dog not among "
                                        r"its 2 labels \(cat, fish\)"):
        data.targets({"0": "cat", "1": "fish"})


@pytest.mark.parametrize("text, message", [
    ("image,tags\npics/a.jpg,cat\n", "needs columns 'image' and 'labels'"),
    ("image,labels\npics/a.jpg,cat\npics/gone.jpg,dog\n", "line 3: image pics/gone.jpg does not exist"),
    ("image,labels\n,cat\n", "line 2: the image column is empty"),
    ("image,labels\n", "holds no rows"),
])
def test_multilabel_set_refusals(tags_csv, text, message):
    with pytest.raises(DataError, match=message):
        read_multilabel_eval(write_csv(tags_csv, text))


def test_eval_kinds_and_classification_unchanged(tmp_path, tags_csv):
    for name in ("cat", "dog"):
        write_image(tmp_path / "folder" / name / "1.jpg")
    assert eval_kind(tmp_path / "folder") == "classification"
    data = read_eval(tmp_path / "folder")
    assert isinstance(data, EvalSet) and data.classes == ["cat", "dog"]
    assert data.indices(LABELS) == [0, 1] and read_eval(tmp_path / "folder", "classification").classes == data.classes
    with pytest.raises(DataError, match="the classes of .* are not the model's labels: dog"):
        data.indices({"0": "cat"})
    text = write_csv(tmp_path / "text.csv", "text,label\nhello,greeting\n")
    assert eval_kind(text) == "text" and read_eval(text, "text").classes == ["greeting"]
    assert eval_kind(write_csv(tmp_path / "t.jsonl", '{"text": "hi", "label": "x"}\n')) == "text"
    with pytest.raises(DataError, match="unknown task 'pose'"):
        read_eval(tags_csv, "pose")


def test_best_thresholds(caplog):
    rng = np.random.default_rng(0)
    targets = np.zeros((200, 3), dtype=bool)
    targets[:20, 0] = True
    targets[::2, 1] = True
    probabilities = rng.uniform(0.0, 0.15, (200, 3))
    probabilities[:20, 0] = rng.uniform(0.2, 0.35, 20)  # a rare label the model scores low but ranks right
    probabilities[::2, 1] = rng.uniform(0.5, 1.0, 100)
    with caplog.at_level(logging.WARNING):
        thresholds = best_thresholds(probabilities, targets)
    # halfway between the lowest positive and the highest negative below it
    assert thresholds[0] == (probabilities[:20, 0].min() + probabilities[20:, 0].max()) / 2
    assert thresholds[2] == 0.5 and "labels 2 have no positive sample" in caplog.text
    tuned = f1_score(targets[:, 0], probabilities[:, 0] >= thresholds[0])
    assert tuned == 1.0 > f1_score(targets[:, 0], probabilities[:, 0] >= 0.5, zero_division=0)


def test_multilabel_scores():
    rng = np.random.default_rng(1)
    targets = rng.random((120, 5)) < [0.1, 0.3, 0.5, 0.0, 1.0]  # label 3 never true, label 4 always
    probabilities = np.clip(targets * 0.4 + rng.random((120, 5)) * 0.7, 0, 1)
    thresholds = best_thresholds(probabilities, targets)
    scores = multilabel_scores(probabilities, targets, thresholds)
    assert scores["skipped_auroc"] == [3, 4]
    assert scores["macro_auroc"] == round(roc_auc_score(targets[:, :3], probabilities[:, :3], average="macro"), 6)
    predicted = probabilities >= thresholds
    assert scores["macro_f1"] == round(f1_score(targets, predicted, average="macro", zero_division=np.nan), 6)
    label = scores["per_label"][1]
    assert label["auroc"] == round(roc_auc_score(targets[:, 1], probabilities[:, 1]), 6)
    assert label["f1"] == round(f1_score(targets[:, 1], predicted[:, 1]), 6)
    assert label["positives"] == int(targets[:, 1].sum()) and label["threshold"] == round(thresholds[1], 6)
    assert scores["per_label"][3]["auroc"] is None
    assert multilabel_scores(probabilities, targets, 0.5)["per_label"][0]["threshold"] == 0.5


# --- label order ---------------------------------------------------------------------------------------------------

def good_confusion(labels=10, per_label=20, right=0.8, seed=0):
    """Truth rows, predictions columns, of a model right ``right`` of the time, in the given order."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(labels), per_label)
    wrong = rng.random(len(truth)) > right
    predicted = np.where(wrong, rng.integers(0, labels, len(truth)), truth)
    return confusion_matrix(truth, predicted, labels)


def test_label_order_finds_a_permutation():
    confusion = good_confusion()
    order = np.random.default_rng(2).permutation(10)
    found = label_order(confusion[:, order])  # output j is label order[j]
    assert found.found == order.tolist() and found.better
    assert found.found_score == round(np.trace(confusion) / confusion.sum(), 6) > found.given_score
    assert found.moved == {j: int(order[j]) for j in range(10) if order[j] != j}


def test_label_order_does_not_fire_on_a_good_model_or_on_noise():
    identity = label_order(good_confusion())
    assert identity.found == list(range(10)) and not identity.better and identity.found_score == identity.given_score
    assert not label_order(np.full((10, 10), 30)).better
    assert label_order(np.full((4, 4), 30)).found == [0, 1, 2, 3]  # ties stay in the given order
    rng = np.random.default_rng(3)
    for labels, samples in [(2, 60), (3, 60), (10, 100), (100, 500)]:
        for _ in range(20):
            truth, predicted = rng.integers(0, labels, (2, samples))
            assert not label_order(confusion_matrix(truth, predicted, labels)).better
    constant = np.zeros((10, 10))
    constant[:, 4] = 20  # an untrained model that always says label 4
    assert not label_order(constant).better
    few = label_order(good_confusion(per_label=4)[:, ::-1])  # 40 samples: too few to judge
    assert few.found == list(range(10))[::-1] and not few.better
