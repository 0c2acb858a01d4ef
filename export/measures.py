"""The figures a model is gated on for each task, computed by the library made for it where one exists.

* Detection (``detection_scores``): COCO box mAP from pycocotools' ``COCOeval``, the number papers and model cards
  quote: ``map`` over IoU 0.50:0.95, ``map50`` and ``map75``, and AP at IoU 0.5 per category, with at most 100
  detections per image (COCO's rule: the highest-scoring ones are kept).
* Segmentation (``confusion_matrix``, ``segmentation_scores``): a pixel confusion matrix summed over the set, then
  mean IoU and pixel accuracy from it, as torchvision's and mmseg's references compute them.
* Multi-label (``best_thresholds``, ``multilabel_scores``): per-label AUROC and F1 from scikit-learn, at a threshold
  per label chosen to maximise F1 on the set.
* Label order (``label_order``): whether the model's outputs match the labels better in another order, found with
  scipy's assignment solver; it catches a labels file written in another order than the one the model was trained
  with (sorted names against the original order, say).

Every figure is rounded to 6 places.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import numpy as np

from export.datasets import DetectionSet

logger = logging.getLogger(__name__)

PLACES = 6


def _rounded(value: float | None) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), PLACES)


def detection_scores(dataset: DetectionSet, detections: list[dict],
                     category_of: dict[int, int] | None = None) -> dict:
    """COCO box mAP of ``detections`` on ``dataset``.

    ``detections[i]`` is for ``dataset.image_ids[i]``: ``{"boxes": (N, 4) x1 y1 x2 y2 in the image's original
    pixels, "labels": (N,) the model's label indices, "scores": (N,)}``. ``category_of`` maps a label index to a COCO
    category id (None: they are the same); detections whose label maps to no category of the set are left out and
    counted as ``unmapped``. No detections at all scores zero.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(dataset.image_ids):
        raise ValueError(f"{len(detections)} detection results for the {len(dataset.image_ids)} images of "
                         f"{dataset.path}; pass one per image, in order")
    results, given, unmapped = [], 0, 0
    for image_id, found in zip(dataset.image_ids, detections):
        boxes = np.asarray(found.get("boxes", []), dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(found.get("labels", []), dtype=np.int64).reshape(-1)
        scores = np.asarray(found.get("scores", []), dtype=np.float64).reshape(-1)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores; "
                             "each detection needs one of each")
        given += len(boxes)
        widths = boxes[:, 2:] - boxes[:, :2]
        for (x, y), (w, h), label, score in zip(boxes[:, :2].tolist(), widths.tolist(), labels.tolist(),
                                                scores.tolist()):
            category = label if category_of is None else category_of.get(label)
            if category not in dataset.categories:
                unmapped += 1
                continue
            results.append({"image_id": image_id, "category_id": category, "bbox": [x, y, w, h], "score": score})

    with_truth = sorted({a["category_id"] for a in dataset.coco["annotations"]})
    names = _category_names(dataset.categories)
    scores = {"map50": 0.0, "map": 0.0, "map75": 0.0, "images": len(dataset.image_ids), "detections": given,
              "unmapped": unmapped, "per_category_ap50": {names[c]: 0.0 for c in with_truth}}
    if not results:  # pycocotools cannot load an empty result list
        return scores

    # COCOeval writes an "ignore" key into the ground truth's annotations: give it copies
    truth_data = {**dataset.coco, "annotations": [dict(a) for a in dataset.coco["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its summary
        truth = COCO()
        truth.dataset = truth_data
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats  # -1 where there is nothing to measure
    scores.update(map=_rounded(max(stats[0], 0.0)), map50=_rounded(max(stats[1], 0.0)),
                  map75=_rounded(max(stats[2], 0.0)))
    # precision: [IoU threshold, recall, category, area range, max detections]; 0 is IoU 0.5, "all" areas, 100 dets
    precision = evaluation.eval["precision"][0, :, :, 0, -1]
    for column, category in enumerate(evaluation.params.catIds):
        values = precision[:, column]
        if category in with_truth and (values > -1).any():
            scores["per_category_ap50"][names[category]] = _rounded(values[values > -1].mean())
    return scores


def _category_names(categories: dict[int, str]) -> dict[int, str]:
    """Category id → a unique name (the id is added to names that several categories share)."""
    counts: dict[str, int] = {}
    for name in categories.values():
        counts[name] = counts.get(name, 0) + 1
    return {c: name if counts[name] == 1 else f"{name} ({c})" for c, name in categories.items()}


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, classes: int, ignore: int | None = None) -> np.ndarray:
    """A classes × classes int64 count of (true, predicted) pairs: rows are the truth, columns the prediction.

    Pairs where either value is negative or ≥ ``classes``, or where the truth is ``ignore`` (VOC's 255: boundary
    pixels nobody labelled), are skipped. Counted with ``np.bincount``: millions of pixels take milliseconds.
    """
    true, predicted = np.asarray(true), np.asarray(predicted)
    if true.shape != predicted.shape:
        raise ValueError(f"the truth is {true.shape} but the prediction is {predicted.shape}; they must match")
    true, predicted = true.reshape(-1).astype(np.int64), predicted.reshape(-1).astype(np.int64)
    keep = (true >= 0) & (true < classes) & (predicted >= 0) & (predicted < classes)
    if ignore is not None:
        keep &= true != ignore
    counts = np.bincount(true[keep] * classes + predicted[keep], minlength=classes * classes)
    return counts.reshape(classes, classes).astype(np.int64)


def segmentation_scores(confusion: np.ndarray) -> dict:
    """Mean IoU, pixel accuracy and each class's IoU from a confusion matrix (truth rows, prediction columns).

    A class absent from both the truth and the prediction has no IoU (None in ``per_class_iou``) and is left out of
    the mean, as torchvision's and mmseg's references do; a class predicted but never true has IoU 0 and counts.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
    present = union > 0
    iou = np.divide(hits, union, out=np.full_like(hits, np.nan), where=present)
    total = confusion.sum()
    return {"mean_iou": _rounded(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": _rounded(hits.sum() / total) if total else 0.0,
            "per_class_iou": [_rounded(value) for value in iou]}


def best_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per label, the threshold that maximises F1 on the set (a sample has the label when its probability is ≥ the
    threshold), placed halfway between the lowest probability it keeps and the next lower one. A label with no positive sample in the set cannot be tuned: it gets 0.5, and a warning names it."""
    from sklearn.metrics import precision_recall_curve

    probabilities, targets = _checked(probabilities, targets)
    thresholds = np.full(probabilities.shape[1], 0.5)
    untuned = []
    for label in range(probabilities.shape[1]):
        if not targets[:, label].any():
            untuned.append(label)
            continue
        precision, recall, cuts = precision_recall_curve(targets[:, label], probabilities[:, label])
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                       where=(precision + recall) > 0)
        best = cuts[int(np.argmax(f1))]
        below = probabilities[:, label][probabilities[:, label] < best]
        # halfway to the next lower probability: the same split of this set, and no sample sits on the threshold,
        # where a served float32 probability and the recorded threshold could fall either way
        thresholds[label] = (best + below.max()) / 2 if below.size else best
    if untuned:
        logger.warning("labels %s have no positive sample in the set: their threshold is left at 0.5",
                       ", ".join(map(str, untuned)))
    return thresholds


def multilabel_scores(probabilities: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | float) -> dict:
    """Macro AUROC and macro F1 of multi-label outputs, and the figures of each label.

    AUROC (``roc_auc_score`` per label) needs both classes: labels that every sample has, or none has, are left out
    of the mean and named in ``skipped_auroc``. F1 is at ``thresholds`` (probability ≥ threshold); a label never
    true nor predicted has no F1 (None) and is left out of the macro mean, as ``f1_score(average="macro",
    zero_division=np.nan)`` does. A mean over no label is None.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    probabilities, targets = _checked(probabilities, targets)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (probabilities.shape[1],))
    predicted = probabilities >= thresholds
    f1 = np.atleast_1d(f1_score(targets, predicted, average=None, zero_division=np.nan))
    per_label, aurocs, skipped = {}, [], []
    for label in range(probabilities.shape[1]):
        positives = int(targets[:, label].sum())
        auroc = None
        if 0 < positives < len(targets):
            auroc = float(roc_auc_score(targets[:, label], probabilities[:, label]))
            aurocs.append(auroc)
        else:
            skipped.append(label)
        per_label[label] = {"auroc": _rounded(auroc), "f1": _rounded(f1[label]),
                            "threshold": _rounded(thresholds[label]), "positives": positives}
    defined = f1[~np.isnan(f1)]
    return {"macro_auroc": _rounded(np.mean(aurocs)) if aurocs else None,
            "macro_f1": _rounded(defined.mean()) if len(defined) else None,
            "per_label": per_label, "skipped_auroc": skipped}


def _checked(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets).astype(bool)
    if probabilities.ndim != 2 or probabilities.shape != targets.shape:
        raise ValueError(f"probabilities {probabilities.shape} and targets {targets.shape} must both be samples × "
                         "labels")
    return probabilities, targets


# when a found label order counts as clearly better than the given one: see LabelOrder.better
MIN_SAMPLES = 30
SAMPLES_PER_LABEL = 5
MIN_FOUND = 0.5
MIN_GAIN = 0.2
MIN_RATIO = 2.0
CHANCE_SIGMAS = 4.0


@dataclass
class LabelOrder:
    """How well the model's outputs match the labels in the given order and in the best order found."""

    found: list[int]  # for each output j, the label it matches best
    given_score: float  # share of samples where output j fires and the truth is label j
    found_score: float  # share of samples where output j fires and the truth is label found[j]
    samples: int
    labels: int

    @property
    def moved(self) -> dict[int, int]:
        """Output → label, for the outputs the found order moves."""
        return {output: label for output, label in enumerate(self.found) if output != label}

    @property
    def better(self) -> bool:
        """Whether the found order is another order and clearly beats the given one; all of:

        * at least ``MIN_SAMPLES`` (30) samples, and ``SAMPLES_PER_LABEL`` (5) per label: in a sparse matrix the
          solver finds a good-looking order in noise alone;
        * the found order explains at least half the samples (``MIN_FOUND``): noise over three or more labels
          hardly ever does;
        * it explains at least twice as many samples as the given order (``MIN_RATIO``), and a larger share by at
          least 0.2 (``MIN_GAIN``) and at least four standard deviations of chance, 4 / √samples
          (``CHANCE_SIGMAS``): a good model in the right order already explains most samples, so it never fires;
          nor does an untrained model (uniform noise: in simulations of 2 to 1000 labels it never fired; constant
          outputs explain one label's share in any order).

        Only a mix-up that touches a good share of the samples can pass: two swapped labels among many change the
        scores too little.
        """
        enough = self.samples >= max(MIN_SAMPLES, SAMPLES_PER_LABEL * self.labels)
        gain = max(MIN_GAIN, CHANCE_SIGMAS / np.sqrt(max(self.samples, 1)))
        return bool(enough and self.moved and self.found_score >= MIN_FOUND
                    and self.found_score >= self.given_score + gain
                    and self.found_score >= MIN_RATIO * self.given_score)


def label_order(agreement: np.ndarray) -> LabelOrder:
    """The order of labels that best matches the model's outputs.

    ``agreement[i, j]`` counts the samples whose truth is label i where the model's output j fires (a confusion
    matrix: truth rows, outputs columns; square). The assignment of outputs to labels with the largest total
    agreement is found with ``scipy.optimize.linear_sum_assignment``; among equal ones it keeps outputs on their own
    label where it can, since ties are broken towards the diagonal.
    """
    from scipy.optimize import linear_sum_assignment

    agreement = np.asarray(agreement, dtype=np.float64)
    if agreement.ndim != 2 or agreement.shape[0] != agreement.shape[1]:
        raise ValueError(f"agreement must be a square labels × outputs matrix; it is {agreement.shape}")
    labels = agreement.shape[0]
    total = agreement.sum()
    # a bonus on the diagonal, a millionth of the total in all, settles ties in favour of the given order
    rows, columns = linear_sum_assignment(agreement + np.eye(labels) * 1e-6 * max(total, 1.0) / labels, maximize=True)
    found = [0] * labels
    for label, output in zip(rows.tolist(), columns.tolist()):
        found[output] = label
    found_sum = float(agreement[rows, columns].sum())
    return LabelOrder(found=found, given_score=_rounded(np.trace(agreement) / total) if total else 0.0,
                      found_score=_rounded(found_sum / total) if total else 0.0, samples=int(total), labels=labels)
