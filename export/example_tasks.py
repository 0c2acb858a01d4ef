"""Users' projects for three more vision tasks: ``python -m export.example_tasks <task> <folder>``.

``<task>`` is ``detection``, ``segmentation`` or ``multilabel``.

Each writer makes, offline and deterministically, what a user arrives with: weights they trained (a torchvision
model's ``state_dict``) and a labelled held-out set in the layout labelling tools export (see export/datasets.py):

* ``write_detection_project``: ``val/images/*.jpg`` (real photos with coloured shapes pasted at known places) and
  ``val/annotations.json`` in COCO format; ``detector.pth``, a torchvision detector trained here for a few steps on
  other scenes made the same way (model label index == COCO category id; 0 is the background);
* ``write_segmentation_project``: ``val/images/<stem>.jpg`` and ``val/masks/<stem>.png`` (class indices, 0 the
  background); ``segmenter.pth``, a torchvision segmentation model trained the same way; ``labels.txt``;
* ``write_multilabel_project``: ``val/labels.csv`` (``image,labels``, names separated by ``|``, the NIH chest X-ray
  layout) beside its images; ``multilabel.pth``, a ResNet-18 trained with ``BCEWithLogitsLoss``; ``labels.txt``.

The segmentation and multi-label projects also hold the user's ``train.py`` with their ``eval_transform`` (what
``make import TRANSFORM=train:eval_transform`` reads).

Each returns a dataclass with the paths, the architecture (``arch``, ``args``: what rebuilds it with
``torchvision.models.get_model(name, weights=None, weights_backbone=None, **args)``), the label names in index order,
the trained model (eval mode) and the figures it reached on its held-out set, measured from the files as written
with export/measures.py (pycocotools' COCOeval, a pixel confusion matrix, scikit-learn's AUROC).

Every model is trained from scratch (no pretrained weights offline) for well under a minute on 2 cores (Adam with a
one-cycle schedule), then its batch-norm statistics are measured again with the final weights (``recalibrate``):
without that, after so few steps, the models in eval mode are little better than chance.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from export.example_project import SEED, crops
from export.samples import PHOTOS, photo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's references use

# What is pasted on the photos: class name → (shape, colour). Saturated colours and plain shapes (their width varies
# a little: near-squares, ellipses): a model trained from scratch for a minute tells them apart.
SHAPES = {"red_square": ("square", (220, 30, 30)), "blue_disc": ("disc", (30, 70, 230)),
          "yellow_triangle": ("triangle", (245, 215, 20))}

# Held-out image sizes (width, height): landscape, portrait and square, as cameras and phones give them.
VAL_SIZES = ((320, 240), (240, 320), (288, 288), (352, 224), (320, 240), (256, 320))
TRAIN_SIZES = ((320, 240), (240, 320))  # few input shapes in training: on CPU each new one costs a slow first step

# Detection
DETECTION_CLASSES = list(SHAPES)
DETECTION_VAL = 18
DETECTION_STEPS, DETECTION_BATCH, DETECTION_LR = 60, 4, 3e-3
DETECTION_ARGS = {"fasterrcnn_mobilenet_v3_large_320_fpn": {"min_size": 240, "max_size": 352},
                  "ssdlite320_mobilenet_v3_large": {}}

# Segmentation
SEGMENTATION_CLASSES = ["red_square", "blue_disc"]
SEGMENTATION_VAL = 12
SEGMENTATION_RESIZE = 160  # the shorter side the images are resized to, in training and in the eval transform
SEGMENTATION_STEPS, SEGMENTATION_BATCH, SEGMENTATION_LR = 40, 8, 2e-3

# Multi-label
MULTILABEL_LABELS = ["red_patch", "blue_patch", "stripes", "grayscale"]  # each with probability 0.4, independently
MULTILABEL_TRAIN, MULTILABEL_VAL = 256, 48
MULTILABEL_RESIZE = 64  # the crops are CROP_SIZE (96) square; the model sees them at 64
MULTILABEL_STEPS, MULTILABEL_BATCH, MULTILABEL_LR = 30, 32, 2e-3


USER_CODE = '''"""The user's evaluation transform: what make import TRANSFORM=train:eval_transform reads."""
import torchvision.transforms as T


def eval_transform():
    return T.Compose([T.Resize({resize}),{crop} T.ToTensor(), T.Normalize({mean}, {std})])
'''


def write_user_code(root: Path, resize: int, crop: bool) -> None:
    """``root/train.py``: the evaluation transform the model was trained with, as a user's training code has it."""
    (root / "train.py").write_text(USER_CODE.format(resize=resize, crop=f" T.CenterCrop({resize})," if crop else "",
                                                    mean=MEAN, std=STD))


def eval_transform(resize: int | None = None):
    """The evaluation transform of the segmentation and multi-label models: the shorter side resized to ``resize``
    (None: kept), ToTensor and ImageNet's normalisation. (The detectors take ToTensor's 0-1 images: they resize and
    normalise inside.)"""
    import torchvision.transforms as T

    steps = [T.Resize(resize)] if resize else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


@dataclass
class TaskProject:
    root: Path
    eval_dir: Path  # what a user passes as EVAL
    checkpoint: Path  # the state_dict
    arch: str  # "torchvision:<name>"
    args: dict  # constructor kwargs besides weights
    labels: list[str]  # names in index order
    model: torch.nn.Module  # trained, eval mode
    seconds: float  # how long writing it took

    @property
    def name(self) -> str:
        return self.arch.split(":", 1)[1]

    def build(self) -> torch.nn.Module:
        """The architecture again, untrained: what an importer rebuilds before loading ``checkpoint``."""
        import inspect

        import torchvision

        builder = torchvision.models.get_model_builder(self.name)
        backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
        return builder(weights=None, **backbone, **self.args)


@dataclass
class DetectionProject(TaskProject):
    categories: dict[int, str] = field(default_factory=dict)  # COCO category id → name (== the model's label index)
    map50: float = 0.0  # COCO mAP@0.5 on val, pycocotools
    map: float = 0.0  # COCO mAP@0.5:0.95
    scores: dict = field(default_factory=dict)  # everything export.measures.detection_scores gave

    @staticmethod
    def eval_transform():
        """What the detector takes: the image as a 0-1 tensor, any size (it resizes and normalises inside)."""
        import torchvision.transforms as T

        return T.ToTensor()


@dataclass
class SegmentationProject(TaskProject):
    resize: int = SEGMENTATION_RESIZE  # the shorter side the images are resized to before the model
    mean_iou: float = 0.0  # on val, at the masks' size, background included
    pixel_accuracy: float = 0.0
    scores: dict = field(default_factory=dict)

    def eval_transform(self):
        return eval_transform(self.resize)


@dataclass
class MultilabelProject(TaskProject):
    resize: int = MULTILABEL_RESIZE
    macro_auroc: float = 0.0  # on val, scikit-learn
    macro_f1: float = 0.0  # at each label's best threshold on val
    scores: dict = field(default_factory=dict)

    def eval_transform(self):
        return eval_transform(self.resize)


# --- scenes: real photos with shapes pasted on them --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    return Image.fromarray(photo(name)).convert("RGB")  # decoded once: scenes are made by the hundred


def background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop of a random photo, at the aspect ratio of ``size`` (width, height), resized to it."""
    image = _photo(list(PHOTOS)[rng.integers(len(PHOTOS))])
    width, height = size
    scale = rng.uniform(0.6, 1.0) * min(image.width / width, image.height / height)
    w, h = int(width * scale), int(height * scale)
    left, top = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
    return image.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)


def scene(rng: np.random.Generator, size: tuple[int, int], classes: list[str], count: tuple[int, int] = (2, 5),
          sides: tuple[int, int] = (28, 84)) -> tuple[Image.Image, list[list[int]], list[int], np.ndarray]:
    """A photo with shapes of ``classes`` pasted on it, apart from each other: the image, each shape's box
    ``[x0, y0, x1, y1]`` (pixels it covers, exclusive end), its class (1-based index into ``classes``) and the
    mask of class indices (0: the photo)."""
    image = background(rng, size)
    draw = ImageDraw.Draw(image)
    mask = Image.new("L", size, 0)
    paint = ImageDraw.Draw(mask)
    boxes, labels = [], []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        for _attempt in range(20):
            side = int(rng.integers(sides[0], min(sides[1], *size) + 1))
            w = side if rng.random() < 0.5 else int(side * rng.uniform(0.7, 1.3))
            w = min(w, size[0])
            x, y = int(rng.integers(0, size[0] - w + 1)), int(rng.integers(0, size[1] - side + 1))
            box = [x, y, x + w, y + side]
            if all(box[2] + 4 <= b[0] or b[2] + 4 <= box[0] or box[3] + 4 <= b[1] or b[3] + 4 <= box[1]
                   for b in boxes):
                break
        else:
            continue
        label = int(rng.integers(len(classes))) + 1
        shape, colour = SHAPES[classes[label - 1]]
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
        corners = [box[0], box[1], box[2] - 1, box[3] - 1]  # PIL draws the end pixel too
        for canvas, fill in ((draw, colour), (paint, label)):
            if shape == "square":
                canvas.rectangle(corners, fill=fill)
            elif shape == "disc":
                canvas.ellipse(corners, fill=fill)
            else:
                canvas.polygon([((box[0] + box[2] - 1) / 2, box[1]), (box[0], box[3] - 1),
                                (box[2] - 1, box[3] - 1)], fill=fill)
        boxes.append(box)
        labels.append(label)
    return image, boxes, labels, np.array(mask)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def recalibrate(model: torch.nn.Module, batches) -> None:
    """Batch-norm statistics measured again on a few training batches with the final weights, then eval mode.

    After a few dozen steps from scratch the running averages (momentum 0.03 to 0.1) still mostly describe the
    first, random, weights: in eval mode the model is then far worse than in training (SSDlite's COCO mAP@0.5 here:
    0.002 before, 0.8 after). Each batch is what the model's forward takes in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
    model.eval()
    for norm in norms:
        norm.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _adam(model: torch.nn.Module, lr: float, steps: int):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    return optimizer, schedule


# --- detection ----------------------------------------------------------------------------------------------------

def detection_batch(rng: np.random.Generator, count: int, size: tuple[int, int]):
    images, targets = [], []
    for _ in range(count):
        image, boxes, labels, _ = scene(rng, size, DETECTION_CLASSES)
        images.append(_to_tensor(image))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    return images, targets


def write_detection_project(root: Path, arch: str = "ssdlite320_mobilenet_v3_large",
                            steps: int = DETECTION_STEPS) -> DetectionProject:
    """``root/val`` (images/ and annotations.json, COCO) and ``root/detector.pth``, a torchvision detector's
    state_dict, trained here. SSDlite is the default: in the same minute a Faster R-CNN (MobileNetV3 320 FPN, about
    1 s a step here against SSDlite's 0.5) reaches a COCO mAP@0.5 near 0.01 where SSDlite reaches 0.8."""
    import torchvision

    from export.datasets import read_detection_eval
    from export.measures import detection_scores

    start = time.perf_counter()
    root = Path(root)
    folder = root / "val" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    categories = {index: name for index, name in enumerate(DETECTION_CLASSES, 1)}
    coco = {"images": [], "annotations": [],
            "categories": [{"id": c, "name": name, "supercategory": "shape"} for c, name in categories.items()]}
    rng = np.random.default_rng(1000 + SEED)
    for number in range(DETECTION_VAL):
        size = VAL_SIZES[number % len(VAL_SIZES)]
        image, boxes, labels, _ = scene(rng, size, DETECTION_CLASSES)
        name = f"{number:03d}.jpg"
        image.save(folder / name, quality=92)
        coco["images"].append({"id": number + 1, "file_name": name, "width": size[0], "height": size[1]})
        for box, label in zip(boxes, labels):
            x, y, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": number + 1,
                                        "category_id": label, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    (root / "val" / "annotations.json").write_text(json.dumps(coco, indent=1))

    torch.manual_seed(SEED)
    args = dict(DETECTION_ARGS.get(arch, {}))
    model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=len(categories) + 1,
                                         **args)
    _fast_training(model)
    optimizer, schedule = _adam(model, DETECTION_LR, steps)
    rng = np.random.default_rng(SEED)
    model.train()
    for step in range(steps):
        images, targets = detection_batch(rng, DETECTION_BATCH, TRAIN_SIZES[step % len(TRAIN_SIZES)])
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    recalibrate(model, (detection_batch(rng, DETECTION_BATCH, size)[0] for size in TRAIN_SIZES * 2))
    torch.save(model.state_dict(), root / "detector.pth")

    dataset = read_detection_eval(root / "val")
    with torch.no_grad():
        found = [model([_to_tensor(Image.open(folder / image["file_name"]))])[0] for image in dataset.coco["images"]]
    scores = detection_scores(dataset, [{key: value.numpy() for key, value in f.items()} for f in found])
    return DetectionProject(root, root / "val", root / "detector.pth", f"torchvision:{arch}",
                            {**args, "num_classes": len(categories) + 1}, ["__background__", *DETECTION_CLASSES],
                            model, round(time.perf_counter() - start, 1), categories, scores["map50"], scores["map"],
                            scores)


def _fast_training(model: torch.nn.Module) -> None:
    """Fewer proposals and sampled regions while training a Faster R-CNN (2000 and 512 per image by default): on
    CPU the box head's RoIAlign backward over 2048 regions dominates a step. Training-time settings only: neither
    the weights nor inference change."""
    rpn, heads = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
    if rpn is not None:
        rpn._pre_nms_top_n = {**rpn._pre_nms_top_n, "training": 300}
        rpn._post_nms_top_n = {**rpn._post_nms_top_n, "training": 300}
    if heads is not None:
        heads.fg_bg_sampler.batch_size_per_image = 64


# --- segmentation -------------------------------------------------------------------------------------------------

def _resized(image: Image.Image, mask: np.ndarray, shorter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image through the eval transform and its mask resized the same way (nearest: class indices stay)."""
    import torchvision.transforms.functional as F

    tensor = eval_transform(shorter)(image)
    target = F.resize(torch.from_numpy(mask)[None], list(tensor.shape[1:]), F.InterpolationMode.NEAREST)[0]
    return tensor, target.long()


def segmentation_batch(rng: np.random.Generator, count: int, size: tuple[int, int], shorter: int):
    pairs = [_resized(*scene(rng, size, SEGMENTATION_CLASSES)[::3], shorter) for _ in range(count)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def write_segmentation_project(root: Path, arch: str = "lraspp_mobilenet_v3_large",
                               steps: int = SEGMENTATION_STEPS) -> SegmentationProject:
    """``root/val`` (images/<stem>.jpg, masks/<stem>.png) and ``root/segmenter.pth``, a torchvision segmentation
    model's state_dict, trained here on images resized to SEGMENTATION_RESIZE on their shorter side."""
    import torchvision

    from export.datasets import read_segmentation_eval
    from export.measures import confusion_matrix, segmentation_scores

    start = time.perf_counter()
    root = Path(root)
    for name in ("images", "masks"):
        (root / "val" / name).mkdir(parents=True, exist_ok=True)
    write_user_code(root, SEGMENTATION_RESIZE, crop=False)
    (root / "labels.txt").write_text("".join(f"{name}\n" for name in ["__background__", *SEGMENTATION_CLASSES]))
    rng = np.random.default_rng(2000 + SEED)
    for number in range(SEGMENTATION_VAL):
        image, _, _, mask = scene(rng, VAL_SIZES[number % len(VAL_SIZES)], SEGMENTATION_CLASSES)
        image.save(root / "val" / "images" / f"{number:03d}.jpg", quality=92)
        Image.fromarray(mask).save(root / "val" / "masks" / f"{number:03d}.png")

    torch.manual_seed(SEED)
    classes = len(SEGMENTATION_CLASSES) + 1
    args = {"num_classes": classes, **({"aux_loss": False} if arch.startswith(("fcn_", "deeplabv3_")) else {})}
    model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **args)
    optimizer, schedule = _adam(model, SEGMENTATION_LR, steps)
    rng = np.random.default_rng(SEED + 1)
    model.train()
    for step in range(steps):
        images, masks = segmentation_batch(rng, SEGMENTATION_BATCH, TRAIN_SIZES[step % len(TRAIN_SIZES)],
                                           SEGMENTATION_RESIZE)
        loss = torch.nn.functional.cross_entropy(model(images)["out"], masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    recalibrate(model, (segmentation_batch(rng, SEGMENTATION_BATCH, size, SEGMENTATION_RESIZE)[0]
                        for size in TRAIN_SIZES * 2))
    torch.save(model.state_dict(), root / "segmenter.pth")

    dataset = read_segmentation_eval(root / "val")
    confusion = np.zeros((classes, classes), dtype=np.int64)
    transform = eval_transform(SEGMENTATION_RESIZE)
    with torch.no_grad():
        for stem, truth in zip(dataset.names, dataset.masks):
            logits = model(transform(Image.open(root / "val" / "images" / f"{stem}.jpg").convert("RGB"))[None])["out"]
            logits = torch.nn.functional.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False)
            confusion += confusion_matrix(truth, logits[0].argmax(0).numpy(), classes)
    scores = segmentation_scores(confusion)
    return SegmentationProject(root, root / "val", root / "segmenter.pth", f"torchvision:{arch}", args,
                               ["__background__", *SEGMENTATION_CLASSES], model,
                               round(time.perf_counter() - start, 1), SEGMENTATION_RESIZE, scores["mean_iou"],
                               scores["pixel_accuracy"], scores)


# --- multi-label --------------------------------------------------------------------------------------------------

def tagged(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """A crop with each of MULTILABEL_LABELS given independently (probability 0.4): turned grey, and patches (red,
    blue, black-and-white stripes) each in a quadrant of its own."""
    names = [name for name in MULTILABEL_LABELS if rng.random() < 0.4]
    if "grayscale" in names:
        image = image.convert("L").convert("RGB")
    else:
        image = image.copy()
    draw = ImageDraw.Draw(image)
    half = image.width // 2
    quadrants = rng.permutation(4)
    for name, quadrant in zip([n for n in names if n != "grayscale"], quadrants):
        side = int(rng.integers(half * 5 // 8, half - 2))
        x = int(quadrant % 2 * half + rng.integers(0, half - side + 1))
        y = int(quadrant // 2 * half + rng.integers(0, half - side + 1))
        if name == "stripes":
            period = int(rng.integers(6, 11))
            vertical = rng.random() < 0.5
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=(235, 235, 235))
            for offset in range(0, side, period):
                end = min(offset + period // 2, side) - 1
                draw.rectangle([x + offset, y, x + end, y + side - 1] if vertical else
                               [x, y + offset, x + side - 1, y + end], fill=(20, 20, 20))
        else:
            colour = (215, 35, 35) if name == "red_patch" else (35, 70, 215)
            draw.rectangle([x, y, x + side - 1, y + side - 1],
                           fill=tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour))
    return image, names


def multilabel_images(count: int, seed: int) -> list[tuple[Image.Image, list[str]]]:
    """Crops of every photo in turn (export.example_project.crops, CROP_SIZE square), tagged."""
    per_photo = -(-count // len(PHOTOS))
    pool = [image for number, name in enumerate(PHOTOS) for image in crops(name, per_photo, seed * 10 + number)]
    rng = np.random.default_rng(seed)
    return [tagged(pool[i], rng) for i in rng.permutation(len(pool))[:count]]


def write_multilabel_project(root: Path, steps: int = MULTILABEL_STEPS) -> MultilabelProject:
    """``root/val/labels.csv`` with its images beside it, ``root/labels.txt`` and ``root/multilabel.pth``, a
    torchvision ResNet-18's state_dict trained here with BCEWithLogitsLoss (one logit per label)."""
    import torchvision

    from export.datasets import read_multilabel_eval
    from export.measures import best_thresholds, multilabel_scores

    start = time.perf_counter()
    root = Path(root)
    (root / "val").mkdir(parents=True, exist_ok=True)
    with open(root / "val" / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels"])
        for number, (image, names) in enumerate(multilabel_images(MULTILABEL_VAL, seed=100 + SEED)):
            image.save(root / "val" / f"{number:03d}.jpg", quality=92)
            writer.writerow([f"{number:03d}.jpg", "|".join(names)])
    (root / "labels.txt").write_text("".join(f"{name}\n" for name in MULTILABEL_LABELS))
    write_user_code(root, MULTILABEL_RESIZE, crop=True)  # the images are square: the crop keeps them whole

    torch.manual_seed(SEED)
    args = {"num_classes": len(MULTILABEL_LABELS)}
    model = torchvision.models.get_model("resnet18", weights=None, **args)
    transform = eval_transform(MULTILABEL_RESIZE)
    train_set = multilabel_images(MULTILABEL_TRAIN, seed=SEED)
    inputs = torch.stack([transform(image) for image, _ in train_set])
    targets = torch.tensor([[name in names for name in MULTILABEL_LABELS] for _, names in train_set],
                           dtype=torch.float32)
    optimizer, schedule = _adam(model, MULTILABEL_LR, steps)
    loss_function = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(steps):
        index = torch.randperm(len(inputs))[:MULTILABEL_BATCH]
        loss = loss_function(model(inputs[index]), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    recalibrate(model, inputs.split(64))
    torch.save(model.state_dict(), root / "multilabel.pth")

    dataset = read_multilabel_eval(root / "val" / "labels.csv")
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(root / "val" / image).convert("RGB")) for image in dataset.images])
        probabilities = torch.sigmoid(model(batch)).numpy()
    truth = dataset.targets({str(i): name for i, name in enumerate(MULTILABEL_LABELS)})
    scores = multilabel_scores(probabilities, truth, best_thresholds(probabilities, truth))
    return MultilabelProject(root, root / "val" / "labels.csv", root / "multilabel.pth", "torchvision:resnet18",
                             args, list(MULTILABEL_LABELS), model, round(time.perf_counter() - start, 1),
                             MULTILABEL_RESIZE, scores["macro_auroc"], scores["macro_f1"], scores)


WRITERS = {"detection": write_detection_project, "segmentation": write_segmentation_project,
           "multilabel": write_multilabel_project}


def describe(project: TaskProject) -> str:
    """One line: what was written and how well the model does on it."""
    figures = {DetectionProject: ("map50", "COCO mAP@0.5"), SegmentationProject: ("mean_iou", "mean IoU"),
               MultilabelProject: ("macro_auroc", "macro AUROC")}[type(project)]
    return (f"{project.root}/: {project.eval_dir.relative_to(project.root)} (EVAL), {project.checkpoint.name} "
            f"({project.arch}, args {project.args}), labels {project.labels}; held-out {figures[1]} "
            f"{getattr(project, figures[0]):.3f}; {project.seconds:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in WRITERS:
        sys.exit(f"usage: python -m export.example_tasks {{{'|'.join(WRITERS)}}} <folder>")
    print(describe(WRITERS[sys.argv[1]](Path(sys.argv[2]))))
