"""The users' projects for detection, segmentation and multi-label (export/example_tasks.py): the held-out sets are
in the layouts labelling tools export, the checkpoints rebuild from what the projects record, and the models
trained here do clearly better than chance on their held-out sets. Each writer runs once (about 2 minutes in all on
2 cores)."""

from __future__ import annotations

import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.example_tasks import (DetectionProject, MultilabelProject, SegmentationProject)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def detection(detection_project) -> DetectionProject:
    return detection_project  # conftest: written once a session, the task tests import the same projects


@pytest.fixture
def segmentation(segmentation_project) -> SegmentationProject:
    return segmentation_project


@pytest.fixture
def multilabel(multilabel_project) -> MultilabelProject:
    return multilabel_project


def reloaded(project) -> torch.nn.Module:
    """The architecture rebuilt from ``arch`` and ``args`` with the checkpoint loaded, as an importer does."""
    assert project.arch.startswith("torchvision:")
    model = project.build()
    model.load_state_dict(torch.load(project.checkpoint, weights_only=True))
    return model.eval()


def test_detection_set_is_coco(detection):
    from pycocotools.coco import COCO

    assert detection.eval_dir == detection.root / "val"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(detection.eval_dir / "annotations.json"))
    assert sorted(coco.getCatIds()) == list(range(1, len(detection.labels)))  # 0 is the background
    assert [coco.cats[c]["name"] for c in sorted(coco.cats)] == detection.labels[1:]
    assert detection.labels[0] == "__background__"
    assert len(coco.getImgIds()) >= 12
    orientations = set()
    for image_id, image in coco.imgs.items():
        with Image.open(detection.eval_dir / "images" / image["file_name"]) as file:
            assert file.size == (image["width"], image["height"]) and file.format == "JPEG"
        orientations.add(np.sign(image["width"] - image["height"]))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(annotations) >= 1
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            assert annotation["area"] == w * h and annotation["iscrowd"] == 0
    assert orientations == {-1, 0, 1}  # portrait, square and landscape
    assert len({a["category_id"] for a in coco.anns.values()}) == len(detection.categories)


def test_detector_detects(detection):
    assert detection.map50 >= 0.3, detection.scores
    assert all(ap > 0.1 for ap in detection.scores["per_category_ap50"].values()), detection.scores
    assert not detection.model.training
    image = Image.open(next((detection.eval_dir / "images").iterdir())).convert("RGB")
    tensor = detection.eval_transform()(image)
    with torch.no_grad():
        ours, theirs = detection.model([tensor])[0], reloaded(detection)([tensor])[0]
    assert torch.equal(ours["labels"], theirs["labels"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"])
    assert set(ours["labels"][ours["scores"] > 0.5].tolist()) <= set(detection.categories)


def test_segmentation_set(segmentation):
    images, masks = segmentation.eval_dir / "images", segmentation.eval_dir / "masks"
    stems = sorted(p.stem for p in images.iterdir())
    assert stems and stems == sorted(p.stem for p in masks.iterdir())
    seen = set()
    for stem in stems:
        with Image.open(images / f"{stem}.jpg") as image, Image.open(masks / f"{stem}.png") as mask:
            assert mask.mode in ("L", "P") and mask.size == image.size
            values = set(np.unique(np.array(mask)).tolist())
        assert values <= set(range(len(segmentation.labels))) and 0 in values
        seen |= values
    assert seen == set(range(len(segmentation.labels)))


def test_segmenter_segments(segmentation):
    # predicting the background everywhere scores about 1/3 here (background IoU ~0.9, the others 0)
    assert segmentation.mean_iou >= 0.6, segmentation.scores
    assert min(segmentation.scores["per_class_iou"]) >= 0.4, segmentation.scores
    assert segmentation.args["num_classes"] == len(segmentation.labels) == 3
    image = Image.open(next((segmentation.eval_dir / "images").iterdir())).convert("RGB")
    batch = segmentation.eval_transform()(image)[None]
    assert min(batch.shape[2:]) == segmentation.resize
    with torch.no_grad():
        torch.testing.assert_close(segmentation.model(batch)["out"], reloaded(segmentation)(batch)["out"])


def test_multilabel_set(multilabel):
    assert multilabel.eval_dir == multilabel.root / "val" / "labels.csv"
    with open(multilabel.eval_dir, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["image", "labels"]
        rows = list(reader)
    assert (multilabel.root / "labels.txt").read_text().splitlines() == multilabel.labels
    assert 3 <= len(multilabel.labels) <= 5
    counts = []
    for row in rows:
        assert (multilabel.eval_dir.parent / row["image"]).is_file()
        names = row["labels"].split("|") if row["labels"] else []
        assert set(names) <= set(multilabel.labels) and len(set(names)) == len(names)
        counts.append(len(names))
    assert 0 in counts and max(counts) >= 2
    for label in multilabel.labels:  # every label has positives and negatives: AUROC is defined for each
        assert 0 < sum(label in row["labels"].split("|") for row in rows) < len(rows)


def test_multilabel_model_ranks(multilabel):
    assert multilabel.macro_auroc >= 0.8, multilabel.scores
    assert multilabel.scores["skipped_auroc"] == []
    image = Image.open(multilabel.eval_dir.parent / "000.jpg").convert("RGB")
    batch = multilabel.eval_transform()(image)[None]
    with torch.no_grad():
        logits = multilabel.model(batch)
        torch.testing.assert_close(logits, reloaded(multilabel)(batch))
    assert logits.shape == (1, len(multilabel.labels))


def test_command_line_usage():
    result = subprocess.run([sys.executable, "-m", "export.example_tasks", "pose", "somewhere"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "detection|segmentation|multilabel" in result.stderr
