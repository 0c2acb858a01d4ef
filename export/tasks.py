"""The tasks a version can serve, and what each asks of the build: its handler, how to find it from an architecture,
how its eager model is called as the server calls it, and how it is exported.

| task             | handler (``handlers/``)  | model as served                                    | export                  |
| ---------------- | ------------------------ | -------------------------------------------------- | ----------------------- |
| classification   | ``image_classifier``     | N x C x H x W → N x classes (softmax in handler)   | ONNX, else TorchScript  |
| multilabel       | ``multilabel_classifier``| N x C x H x W → N x labels (sigmoid in handler)    | ONNX, else TorchScript  |
| detection        | ``object_detector``      | 1 x 3 x H x W in [0, 1] → boxes, labels, scores    | TorchScript (scripted)  |
| segmentation     | ``image_segmenter``      | 1 x 3 x H x W normalised → 1 x classes x H x W     | ONNX, else TorchScript  |

torchvision's detection and segmentation models answer with dicts (and detectors take a list of images), which
neither exporter takes: ``served_module`` wraps them into the tensor-in, tensors-out call above, for the parity
check, the exports and the accuracy measurement alike. A user's own class is wrapped the same way when it answers
as torchvision's do (a detector: a list of CHW images → a list of dicts of ``boxes``, ``labels``, ``scores``; a
segmenter: a dict with ``out``), and is taken as it is when it already returns tensors.

Detectors go to TorchScript by scripting, not by ONNX: ``torch.export`` cannot capture their data-dependent box
counts (measured with torch 2.13 on ``ssdlite320_mobilenet_v3_large`` and ``fasterrcnn_mobilenet_v3_large_320_fpn``),
and tracing fixes the image size into ``fasterrcnn``'s graph (boxes off by hundreds of pixels on another size).
"""

from __future__ import annotations

from typing import Any

import torch

from handlers import TASK_HANDLERS
# why a task is not exported to ONNX (recorded in the spec and the build record)
TORCHSCRIPT_ONLY = {"detection": "torch.export cannot capture a detector's data-dependent number of boxes; "
                                 "scripted to TorchScript, which keeps them dynamic"}
EXPORTS = {"detection": {"method": "script", "freeze": True}}


class TaskError(ValueError):
    """A task that does not fit the model or the request; the message says what to do."""


def task_of_handler(handler: str) -> str | None:
    return next((task for task, name in TASK_HANDLERS.items() if name == handler), None)


def task_of_arch(arch: str | None) -> str | None:
    """The task a torchvision architecture name is built for (``torchvision:fasterrcnn_...`` → detection); None
    where the name does not say (timm's, a user's own class)."""
    if not arch or not arch.startswith("torchvision:"):
        return None
    import torchvision

    name = arch.partition(":")[2]
    for task, module in (("detection", torchvision.models.detection),
                         ("segmentation", torchvision.models.segmentation)):
        if name in torchvision.models.list_models(module=module):
            return task
    return None


class DetectionOutputs(torch.nn.Module):
    """A torchvision-style detector called with one image (1 x 3 x H x W) → its boxes, labels and scores."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():  # a scripted detector answers (losses, detections)
            found = self.detector([images[0]])[1][0]
        else:
            found = self.detector([images[0]])[0]
        return found["boxes"], found["labels"], found["scores"]


class SegmentationOutputs(torch.nn.Module):
    """A torchvision-style segmenter (a dict with ``out``) → its class scores only."""

    def __init__(self, segmenter: torch.nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images)["out"]


def served_module(model: Any, task: str | None, example) -> Any:
    """The eager model as the handler calls it (see the table above); anything that is not an eager torch module
    (a TorchScript or ONNX file served as it is) as it is. ``example``: one collated input, to see what the model
    answers."""
    if task not in ("detection", "segmentation") or not isinstance(model, torch.nn.Module) \
            or isinstance(model, torch.jit.ScriptModule):
        return model
    image = torch.from_numpy(example if not isinstance(example, list) else example[0])
    with torch.inference_mode():
        if task == "detection":
            try:
                answer = model([image[0]])
            except Exception as error:  # noqa: BLE001 (the user's class: any failure means it is not of that kind)
                raise TaskError(f"the model is not a torchvision-style detector (a list of images → a list of "
                                f"dicts of boxes, labels, scores): {type(error).__name__}: {str(error)[:200]}")
            if isinstance(answer, list) and answer and isinstance(answer[0], dict) and "boxes" in answer[0]:
                return DetectionOutputs(model).eval()
            raise TaskError("the detector answers neither a list of dicts with boxes, labels and scores nor three "
                            "tensors; see export/tasks.py for what a detector must return")
        answer = model(image)
    if isinstance(answer, dict) and "out" in answer:
        return SegmentationOutputs(model).eval()
    if isinstance(answer, torch.Tensor) and answer.ndim == 4:
        return model
    raise TaskError("the segmenter answers neither a dict with 'out' nor one N x classes x H x W tensor")
