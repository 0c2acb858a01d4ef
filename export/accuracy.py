"""Held-out accuracy of a version, per task, measured through the exported model and the handler: what the server
computes, on the bytes a client would send (the figures themselves: ``export/measures.py``; the sets:
``export/datasets.py``).

| task                          | ``EVAL``                                      | first figure (``held_out``) | also            |
| ----------------------------- | --------------------------------------------- | --------------------------- | --------------- |
| classification (image, text)  | ``<root>/<class>/<image>``; CSV/JSONL of text | top-1                       | top-5           |
| detection                     | ``images/`` + ``annotations.json`` (COCO)     | mAP@0.5 (pycocotools)       | mAP@0.5:0.95    |
| segmentation                  | ``images/`` + ``masks/`` (PNG class indices)  | mean IoU                    | pixel accuracy  |
| multilabel                    | CSV ``image,labels`` (``a|b``), images beside | macro AUROC                 | macro F1        |

The first figure is what ``min_accuracy`` gates, ``describe`` shows, the workers export as ``handler_accuracy``
and ``promote`` compares; the record names it (``metric``).

**Labels in the order the model was trained.** A model trained with its classes in one order and served with its
labels in another answers every request under a wrong name, and nothing else shows it. Each task counts how often
the truth says label i where output j fires (classification: the confusion matrix; detection: the labels of
boxes matched by position alone; segmentation: pixels; multilabel: positives). Where another order explains the
set clearly better (``measures.label_order``), the version is refused (``LabelOrderError``), with the order found
and the figure under each; ``make import LABEL_ORDER=found`` takes the order found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from export import measures
from export.datasets import DataError, label_names, read_eval

logger = logging.getLogger(__name__)

EVAL_BATCH = 64
MATCH_IOU = 0.5  # detection: a box matches a true one at this overlap, whatever its label (for the label order)
MATCH_SCORE = 0.3  # ... from this score up
IGNORE_INDEX = 255  # segmentation masks: pixels labelled 255 are not counted (PASCAL VOC's convention)
METRICS = {"classification": "top1", "detection": "map50", "segmentation": "mean_iou", "multilabel": "macro_auroc"}


class LabelOrderError(DataError):
    """The model's outputs match its labels in another order far better than in the order given."""

    def __init__(self, message: str, found: list[str]):
        super().__init__(message)
        self.found = found  # the label names in the order found, output 0 first


def digest(payloads: list[bytes], truth: list[Any]) -> str:
    """What an evaluation set is, by content: two versions measured on the same digest can be compared."""
    hashed = hashlib.sha256()
    for payload, label in zip(payloads, truth):
        hashed.update(json.dumps(label, sort_keys=True, default=str).encode() + b"\0" + hashlib.sha256(payload).digest())
    return hashed.hexdigest()


def batches(items: list, name: str):
    for start in tqdm(range(0, len(items), EVAL_BATCH), desc=f"accuracy on {name}", unit="batch", leave=False,
                      disable=None):
        yield start, items[start:start + EVAL_BATCH]


def check_order(agreement: np.ndarray, labels: dict | None, metric: str, samples: int | None = None) -> dict:
    """The label-order check on an agreement matrix (truth rows, outputs columns); refused where another order is
    clearly better. ``samples``: how many samples the matrix stands for, where its entries are not counts of them
    (a multi-label model's positives above chance)."""
    order = measures.label_order(agreement)
    if samples is not None:
        order = dataclasses.replace(order, samples=samples)
    record = {"given_score": order.given_score, "found_score": order.found_score, "samples": order.samples}
    if not order.better or labels is None:
        return record
    names = label_names(labels)
    found = [names[label] for label in order.found]
    moved = ", ".join(f"output {output} is {names[label]!r}, not {names[output]!r}"
                      for output, label in list(order.moved.items())[:6])
    raise LabelOrderError(
        f"the model's outputs match its labels in another order far better: {moved}"
        f"{' ...' if len(order.moved) > 6 else ''}. Agreement in the order given {order.given_score:.3f}, in the "
        f"order found {order.found_score:.3f} ({order.samples} {metric} counts). Order found: {found}. Pass LABELS "
        "in the order the model was trained, or LABEL_ORDER=found to take the order found", found)


# --- classification --------------------------------------------------------------------------------------------


def classification(model, handler, payloads: list[bytes], indices: list[int], name: str,
                   labels: dict | None = None) -> dict:
    """Top-1 (``held_out``) and, with more than five classes, top-5 through the handler's own decoding."""
    top1 = top5 = 0
    classes = len(labels) if labels else None
    predicted = []
    for start, chunk in batches(payloads, name):
        batch = handler.collate([handler.decode(p) for p in chunk])
        outputs = np.asarray(handler.forward(model, batch))
        classes = outputs.shape[1]
        ranked = np.argsort(-outputs, axis=1, kind="stable")[:, :min(5, classes)]
        target = np.asarray(indices[start:start + EVAL_BATCH])[:, None]
        top1 += int((ranked[:, :1] == target).sum())
        top5 += int((ranked == target).any(axis=1).sum())
        predicted += ranked[:, 0].tolist()
    result = {"metric": "top1", "held_out": round(top1 / len(indices), 6), "correct": top1, "samples": len(indices)}
    if classes > 5:
        result["top5"] = round(top5 / len(indices), 6)
    result["eval_set"] = {"name": name, "sha256": digest(payloads, indices)}
    agreement = measures.confusion_matrix(np.asarray(indices), np.asarray(predicted), classes)
    result["label_order"] = check_order(agreement, labels, "answers")
    return result


# --- detection, segmentation, multilabel -----------------------------------------------------------------------


def detection(model, handler, path: Path, labels: dict | None) -> dict:
    data = read_eval(path, "detection")
    names = {name: int(index) for index, name in zip(labels or {}, label_names(labels or {}))}
    unknown = sorted({name for name in data.categories.values() if name not in names})
    if unknown:
        raise DataError(f"{path}: categories {', '.join(unknown[:8])} are not among the model's labels")
    category_of = {index: next(cid for cid, name in data.categories.items() if name == label)
                   for label, index in names.items() if label in data.categories.values()}
    found, agreement = [], np.zeros((len(names), len(names)), dtype=np.int64)
    everything = {"threshold": 0.0, "max_detections": handler.OPTIONS["max_detections"][2]}
    for start, chunk in batches(data.payloads, str(path)):
        items = [handler.with_options(handler.decode(p), everything) for p in chunk]
        answers = handler.answer(handler.forward(model, handler.collate(items)), items)
        for offset, answer in enumerate(answers):
            boxes = np.array([d["box"] for d in answer["detections"]], dtype=np.float64).reshape(-1, 4)
            found.append({"boxes": boxes, "labels": np.array([d["index"] for d in answer["detections"]]),
                          "scores": np.array([d["score"] for d in answer["detections"]])})
            matches(agreement, data, start + offset, found[-1], names)
    scores = measures.detection_scores(data, found, category_of)
    truth = [sorted((a["category_id"], *a["bbox"]) for a in data.coco["annotations"] if a["image_id"] == image)
             for image in data.image_ids]
    return {"metric": "map50", "held_out": scores["map50"], "map": scores["map"], "map75": scores["map75"],
            "per_category_ap50": scores["per_category_ap50"], "samples": len(data.payloads),
            "eval_set": {"name": str(path), "sha256": digest(data.payloads, truth)},
            "label_order": check_order(agreement, labels, "matched boxes")}


def matches(agreement: np.ndarray, data, position: int, found: dict, names: dict[str, int]) -> None:
    """Count each true box's label against the label of the most confident box over it (IoU ≥ MATCH_IOU, score ≥
    MATCH_SCORE), whatever its label."""
    image = data.image_ids[position]
    confident = found["scores"] >= MATCH_SCORE
    boxes, predicted = found["boxes"][confident], found["labels"][confident]
    for annotation in (a for a in data.coco["annotations"] if a["image_id"] == image):
        x, y, w, h = annotation["bbox"]
        if not len(boxes):
            return
        left, top = np.maximum(boxes[:, 0], x), np.maximum(boxes[:, 1], y)
        right, bottom = np.minimum(boxes[:, 2], x + w), np.minimum(boxes[:, 3], y + h)
        overlap = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
        union = w * h + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - overlap
        iou = overlap / np.maximum(union, 1e-9)
        best = int(np.argmax(iou))
        truth = names.get(data.categories[annotation["category_id"]])
        if iou[best] >= MATCH_IOU and truth is not None and 0 <= predicted[best] < len(agreement):
            agreement[truth, int(predicted[best])] += 1


def segmentation(model, handler, path: Path, labels: dict | None) -> dict:
    data = read_eval(path, "segmentation")
    classes = len(labels) if labels else None
    confusion = None
    for start, chunk in batches(data.payloads, str(path)):
        items = [handler.decode(p) for p in chunk]
        outputs = handler.forward(model, handler.collate(items))
        for offset, (output, item) in enumerate(zip(outputs, items)):
            predicted = handler.class_map(output, item)
            mask = data.masks[start + offset]
            if mask.shape != predicted.shape:
                raise DataError(f"{path}: the mask of {data.names[start + offset]} is {mask.shape[1]}x{mask.shape[0]}"
                                f" but its image is {predicted.shape[1]}x{predicted.shape[0]}")
            classes = classes or int(np.asarray(output).shape[1])
            matrix = measures.confusion_matrix(mask.ravel(), predicted.ravel(), classes, ignore=IGNORE_INDEX)
            confusion = matrix if confusion is None else confusion + matrix
    scores = measures.segmentation_scores(confusion)
    return {"metric": "mean_iou", "held_out": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"],
            "per_class_iou": scores["per_class_iou"], "samples": len(data.payloads),
            "eval_set": {"name": str(path), "sha256": digest(data.payloads, [hashlib.sha256(m.tobytes()).hexdigest()
                                                                  for m in data.masks])},
            "label_order": check_order(confusion, labels, "pixels")}


def multilabel(model, handler, path: Path, labels: dict | None) -> dict:
    if labels is None:
        raise DataError(f"{path}: a multi-label model needs labels to map the set's names onto")
    data = read_eval(path, "multilabel")
    targets = data.targets(labels)
    logits = []
    for _, chunk in batches(data.payloads, str(path)):
        logits.append(np.asarray(handler.forward(model, handler.collate([handler.decode(p) for p in chunk]))))
    probabilities = 1.0 / (1.0 + np.exp(-np.concatenate(logits).astype(np.float64)))
    chosen = handler.settings["thresholds"] == "f1"
    thresholds = (measures.best_thresholds(probabilities, targets) if chosen
                  else handler.label_thresholds(probabilities.shape[1]))
    scores = measures.multilabel_scores(probabilities, targets, thresholds)
    if scores["macro_auroc"] is None:
        raise DataError(f"{path}: every label is on all of its images or on none: AUROC needs both; add images with "
                        "and without each label")
    names = label_names(labels)
    # positives above chance: how much more often output j fires (at 0.5: thresholds chosen on labels in a wrong
    # order would be chosen to fire on everything) on label i's images than on any image
    fired = (probabilities >= 0.5).astype(np.float64)
    together = targets.T.astype(np.float64) @ fired
    agreement = np.clip(together - np.outer(targets.sum(axis=0), fired.sum(axis=0)) / len(targets), 0, None)
    return {"metric": "macro_auroc", "held_out": scores["macro_auroc"], "macro_f1": scores["macro_f1"],
            "thresholds": {names[i]: round(float(t), 6) for i, t in enumerate(thresholds)},
            "thresholds_chosen": "to maximise each label's F1 on this set" if chosen else "the spec's",
            "per_label": scores["per_label"], "samples": len(data.payloads),
            "eval_set": {"name": str(path), "sha256": digest(data.payloads, data.labels)},
            "label_order": check_order(agreement, labels, "images", samples=len(targets))}


MEASURES = {"detection": detection, "segmentation": segmentation, "multilabel": multilabel}
