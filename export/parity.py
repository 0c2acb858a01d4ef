"""The parity check that gates every archive, whatever its runtime.

``check_parity`` takes the exported model loaded back as the server loads it (``handlers.runtime.load_model``) and
compares it with the eager model on named batches of real inputs (the build passes each input alone and all of them
together, so the batch axis is proven dynamic). A batch is whatever the handler's ``collate`` makes and is run through
the handler's ``forward`` (a tensor, a tuple such as token ids and mask, a list of differently sized images); every
tensor in the outputs is compared. Any output more than ``tolerance`` (max abs, scaled by the largest eager output
where that is above 1: logits of 15 carry float32 rounding fifteen times larger than probabilities do) away from
eager, or an input the exported model cannot take, fails the check, naming the input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

PARITY_TOLERANCE = 1e-4
BOX_TOLERANCE = 1.0  # pixels: a detector's boxes
SCORE_TOLERANCE = 1e-3  # a detector's scores, and how far above the lowest kept score a box must be to be compared


class ParityError(RuntimeError):
    """The exported model's outputs differ from the eager model's by more than the tolerance."""


@dataclass
class ParityResult:
    max_abs_diff: float
    worst_input: str
    inputs: int
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def arrays_of(outputs: Any) -> list[np.ndarray]:
    """Every array in a model's outputs: an array, or tuples, lists and dicts of them."""
    if isinstance(outputs, np.ndarray):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in arrays_of(item)]
    return []


def matched_detections(expected: list, actual: list, name: str) -> float:
    """Detections compared box by box: each image's (boxes, labels, scores) from eager and from the export. Where
    scores are near-equal, two runtimes may list boxes in another order, and cut the list (a detector's
    ``detections_per_img``) at another box, so each eager box scoring clearly above the lowest score either side
    kept must have a box of the same label in the export within ``BOX_TOLERANCE`` pixels and ``SCORE_TOLERANCE``
    of its score. The largest box difference, in pixels, is returned."""
    worst = 0.0
    for image, ((boxes, labels, scores), (their_boxes, their_labels, their_scores)) in enumerate(zip(expected, actual)):
        floor = max(float(scores.min(initial=0.0)), float(their_scores.min(initial=0.0))) + SCORE_TOLERANCE
        for box, label, score in zip(boxes[scores > floor], labels[scores > floor], scores[scores > floor]):
            candidates = np.flatnonzero((their_labels == label) & (np.abs(their_scores - score) <= SCORE_TOLERANCE))
            distance = np.abs(their_boxes[candidates] - box).max(axis=1, initial=0.0) if len(candidates) else []
            if not len(candidates) or float(np.min(distance)) > BOX_TOLERANCE:
                raise ParityError(f"parity check failed on {name}: image {image}: the eager box {np.round(box, 1)} "
                                  f"(label {int(label)}, score {float(score):.4f}) has no counterpart in the export "
                                  f"within {BOX_TOLERANCE} px and {SCORE_TOLERANCE} of its score")
            worst = max(worst, float(np.min(distance)))
    return worst


def check_parity(eager: Callable, exported: Callable, cases: dict[str, Any],
                 tolerance: float = PARITY_TOLERANCE, forward: Callable | None = None,
                 detections: bool = False) -> ParityResult:
    """Compare the export, loaded as the server loads it, with eager on each named batch of inputs, both run
    through ``forward(model, batch)`` (default: ``model(batch)``). Both models take and give numpy arrays
    (``handlers.runtime.numpy_model``). ``detections``: the outputs are each image's boxes, labels and scores,
    compared box by box (``matched_detections``; the result's difference is then in pixels)."""
    forward = forward or (lambda model, batch: model(batch))
    worst_name, worst = "", -1.0
    for name, batch in cases.items():
        expected = forward(eager, batch)
        try:
            actual = forward(exported, batch)
        except Exception as error:  # the runtime's own error (a fixed axis, a missing operator), named and kept
            raise ParityError(f"parity check failed on {name}: the exported model cannot run it: "
                              f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error
        if detections:
            diff = matched_detections(expected, actual, name)
            worst_name, worst = (name, diff) if diff > worst else (worst_name, worst)
            continue
        expected, actual = arrays_of(expected), arrays_of(actual)
        shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in actual]
        if shapes[0] != shapes[1]:
            raise ParityError(f"parity check failed on {name}: exported output shapes {shapes[1]} "
                              f"!= eager {shapes[0]}")
        diff = max(float(np.abs(e.astype(np.float32) - a.astype(np.float32)).max(initial=0.0))
                   for e, a in zip(expected, actual))
        largest = max(float(np.abs(e.astype(np.float32)).max(initial=0.0)) for e in expected)
        allowed = tolerance * max(1.0, largest)
        if diff != diff or diff > allowed:  # NaN counts as a failure
            scaled = f" ({tolerance:g} x the largest output, {largest:.3g})" if largest > 1 else ""
            raise ParityError(f"parity check failed on {name}: max |exported - eager| = {diff:.3g} "
                              f"> tolerance {allowed:.3g}{scaled}")
        if diff > worst:
            worst_name, worst = name, diff
    return ParityResult(max_abs_diff=worst, worst_input=worst_name, inputs=len(cases), tolerance=tolerance)
