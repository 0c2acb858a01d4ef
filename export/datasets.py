"""A user's data, read as the server will see it: labels files and held-out evaluation sets.

Labels (``read_labels``): a JSON index → name map (``{"0": "cat"}``; a value may be a list such as
``["n01440764", "tench"]``), a JSON list of names, or a text file with one name per line; always returned as
TorchServe's ``index_to_name.json`` map.

Evaluation sets (``read_eval``), detected from the path:
* a folder in ImageFolder layout (``<root>/<class>/<image>``): the class names are the sorted folder names, and every
  file is sent as it is on disk, the bytes a client would send;
* a ``.csv`` file with columns ``text`` and ``label``, or a ``.jsonl`` file of ``{"text": ..., "label": ...}`` lines:
  each text is sent as UTF-8.

``EvalSet.indices(labels)`` maps the set's class names onto the model's labels by name (a label that is a list
matches any of its names; a name that is a number is taken as the index itself) and refuses, naming them, classes
that are not among the model's labels.

Held-out sets for the other tasks, as labelling tools export them (``read_eval(path, task)``, or the reader itself;
``eval_kind(path)`` guesses the task from the layout). Every sample is still the bytes of its file:
* detection (``read_detection_eval``): ``<root>/images/`` and ``<root>/annotations.json`` in COCO format. Every
  listed image must be in ``images/``; boxes are ``[x, y, width, height]`` in the image's pixels, four numbers, no
  negative size, inside the image give or take a pixel; ids are unique and annotations name listed images and
  categories. Fields pycocotools needs and tools leave out are filled in (an annotation's ``id``, ``area`` as
  width × height, ``iscrowd`` 0; an image's size from its header).
* segmentation (``read_segmentation_eval``): ``<root>/images/<stem>.<ext>`` and ``<root>/masks/<stem>.png``, one
  mask per image. A mask is a single-channel PNG (mode L, P, I;16 or 1) of class indices: a palette PNG is read as
  its indices, not its colours, and values such as 255 (VOC's "ignore") are kept as they are. An image and its mask
  must have the same size, read from the image's header.
* multi-label (``read_multilabel_eval``): a ``.csv`` with columns ``image`` and ``labels`` (others are ignored):
  the image's path relative to the CSV's folder and its labels separated by ``|`` (an empty field: none).
  ``MultilabelSet.targets(labels)`` maps the names onto the model's labels as ``EvalSet.indices`` does.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".csv", ".jsonl")
SKIPPED = {".DS_Store", "Thumbs.db"}
TASKS = ("classification", "text", "detection", "segmentation", "multilabel")
MASK_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B"}  # single channel: the values are the class indices


class DataError(ValueError):
    """A labels file or an evaluation set that cannot be used; the message names the file and the problem."""


def read_labels(path: Path) -> dict[str, str | list[str]]:
    """A labels file as an index → name map."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"labels file {path} is not valid JSON: {error}") from None
        if isinstance(data, list):
            return as_mapping(data)
        if isinstance(data, dict) and all(str(k).isdigit() for k in data):
            if sorted(int(k) for k in data) != list(range(len(data))):
                raise DataError(f"labels file {path}: the indices must be 0 to {len(data) - 1}, each once")
            return {str(k): v for k, v in sorted(data.items(), key=lambda item: int(item[0]))}
        raise DataError(f"labels file {path}: expected a JSON list of names or an index → name map")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"labels file {path} is empty")
    return as_mapping(names)


def as_mapping(names: list) -> dict[str, str | list[str]]:
    return {str(index): name if isinstance(name, list) else str(name) for index, name in enumerate(names)}


def label_names(labels: dict[str, str | list[str]]) -> list[str]:
    """The readable name of each class, in index order (the last of a list such as ["n01440764", "tench"])."""
    return [name[-1] if isinstance(name, list) else name for _, name in sorted(labels.items(), key=lambda i: int(i[0]))]


def class_folders(root: Path) -> list[str]:
    """ImageFolder's rule: the sorted names of the subfolders that hold files."""
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders: an image evaluation set is <root>/<class name>/<image files>")
    return classes


@dataclass
class EvalSet:
    path: Path
    payloads: list[bytes]  # each sample as a client sends it
    classes: list[str]  # each sample's class name

    def indices(self, labels: dict[str, str | list[str]]) -> list[int]:
        """Each sample's class as an index into the model's labels; classes that are not labels are refused."""
        index_of = _label_index(self.path, set(self.classes), labels, "classes")
        return [index_of[c] for c in self.classes]


@dataclass
class DetectionSet:
    path: Path
    payloads: list[bytes]  # each image as a client sends it
    image_ids: list[int]  # its COCO image id
    sizes: list[tuple[int, int]]  # its (width, height), as the annotations give it
    coco: dict  # the annotations, with what pycocotools needs filled in
    categories: dict[int, str]  # COCO category id → name


@dataclass
class SegmentationSet:
    path: Path
    payloads: list[bytes]
    names: list[str]  # the file stem shared by an image and its mask
    masks: list[np.ndarray]  # H×W class indices, values as stored (255 may mean "ignore")


@dataclass
class MultilabelSet:
    path: Path
    payloads: list[bytes]
    images: list[str]  # the image column, as written in the CSV
    labels: list[list[str]]  # each image's label names, possibly none
    names: list[str]  # every label name in the set, sorted

    def targets(self, labels: dict[str, str | list[str]]) -> np.ndarray:
        """An N × len(labels) boolean matrix: which of the model's labels each image has; unknown names are
        refused."""
        index_of = _label_index(self.path, set(self.names), labels, "labels")
        targets = np.zeros((len(self.labels), len(labels)), dtype=bool)
        for row, names in enumerate(self.labels):
            targets[row, [index_of[name] for name in names]] = True
        return targets


def _label_index(path: Path, names: set[str], labels: dict[str, str | list[str]], what: str) -> dict[str, int]:
    """Each name's index among the model's labels, by name (or as the index itself); refuses names that are not
    labels."""
    by_name = {}
    for index, name in labels.items():
        for alias in name if isinstance(name, list) else [name]:
            by_name.setdefault(str(alias), int(index))
    unknown = sorted(n for n in names if n not in by_name and not (n.isdigit() and n in labels))
    if unknown:
        shown = ", ".join(label_names(labels)[:8])
        raise DataError(f"the {what} of {path} are not the model's labels: {', '.join(unknown[:8])}"
                        f"{' ...' if len(unknown) > 8 else ''} not among its {len(labels)} labels ({shown}"
                        f"{' ...' if len(labels) > 8 else ''})")
    return {n: by_name[n] if n in by_name else int(n) for n in names}


def eval_kind(path: Path) -> str:
    """The task an evaluation set is laid out for: detection, segmentation, multilabel, text or classification."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"evaluation set {path} does not exist")
    if path.is_dir():
        if (path / "annotations.json").is_file():
            return "detection"
        if (path / "masks").is_dir():
            return "segmentation"
        return "classification"
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        return "multilabel" if {"image", "labels"} <= set(header) else "text"
    if path.suffix == ".jsonl":
        return "text"
    raise DataError(f"evaluation set {path}: expected a folder or a .csv or .jsonl file; see the evaluation set "
                    "layouts in export/datasets.py")


def read_eval(path: Path, task: str | None = None) -> EvalSet | DetectionSet | SegmentationSet | MultilabelSet:
    """An evaluation set: for classification and text (or no task) an image folder, a CSV or a JSONL file; for
    the other tasks their own layouts (see the module docstring)."""
    path = Path(path)
    if task not in (None, *TASKS):
        raise DataError(f"evaluation set {path}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "detection":
        return read_detection_eval(path)
    if task == "segmentation":
        return read_segmentation_eval(path)
    if task == "multilabel":
        return read_multilabel_eval(path)
    if not path.exists():
        raise DataError(f"evaluation set {path} does not exist")
    if path.is_dir():
        samples = _image_folder(path)
    elif path.suffix in TEXT_SUFFIXES:
        samples = _text_rows(path)
    else:
        raise DataError(f"evaluation set {path}: expected an image folder (<root>/<class>/<image>), a .csv or a "
                        ".jsonl file of text and label")
    if not samples:
        raise DataError(f"evaluation set {path} holds no samples")
    return EvalSet(path, [payload for _, payload in samples], [name for name, _ in samples])


def _image_folder(root: Path) -> list[tuple[str, bytes]]:
    samples = []
    for name in class_folders(root):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.name not in SKIPPED
                       and not p.name.startswith("."))
        samples += [(name, file.read_bytes()) for file in files]
    return samples


def _text_rows(path: Path) -> list[tuple[str, bytes]]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: the CSV needs columns 'text' and 'label'; it has {reader.fieldnames}")
            rows = list(reader)
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not JSON: {error}") from None
            if not isinstance(rows[-1], dict) or not {"text", "label"} <= set(rows[-1]):
                raise DataError(f"{path}, line {number}: expected {{\"text\": ..., \"label\": ...}}")
    return [(str(row["label"]), str(row["text"]).encode()) for row in rows]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in SKIPPED and not p.name.startswith("."))


def _listed(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _header_size(file: Path) -> tuple[int, int]:
    """An image's (width, height) from its header, without decoding it."""
    try:
        with Image.open(file) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{file} is not an image Pillow can read ({error}); remove it or export it again") from None


def read_detection_eval(root: Path) -> DetectionSet:
    """A detection set: ``<root>/images/`` and ``<root>/annotations.json`` in COCO format."""
    root = Path(root)
    listing, folder = root / "annotations.json", root / "images"
    if not root.is_dir():
        raise DataError(f"detection set {root} is not a folder: expected <root>/images/ and <root>/annotations.json")
    if not listing.is_file():
        raise DataError(f"detection set {root} has no annotations.json: export the boxes in COCO format to {listing}")
    if not folder.is_dir():
        raise DataError(f"detection set {root} has no images/ folder: put the images listed in {listing.name} in "
                        f"{folder}")
    try:
        data = json.loads(listing.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{listing} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "categories")) \
            or not isinstance(data.get("annotations", []), list):
        raise DataError(f"{listing} is not COCO: expected an object with lists 'images', 'annotations' and "
                        "'categories'")

    categories: dict[int, str] = {}
    for category in data["categories"]:
        if not isinstance(category, dict) or not _is_id(category.get("id")) or "name" not in category:
            raise DataError(f"{listing}: category {category!r} needs an integer 'id' and a 'name'")
        if category["id"] in categories:
            raise DataError(f"{listing}: category id {category['id']} is used twice; ids must be unique")
        categories[category["id"]] = str(category["name"])

    images, payloads, sizes = [], [], {}
    for image in data["images"]:
        if not isinstance(image, dict) or not _is_id(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise DataError(f"{listing}: image {image!r} needs an integer 'id' and a 'file_name'")
        if image["id"] in sizes:
            raise DataError(f"{listing}: image id {image['id']} is used twice; ids must be unique")
        file = folder / image["file_name"]
        if not file.is_file() and (root / image["file_name"]).is_file():  # some tools write "images/<name>"
            file = root / image["file_name"]
        if not file.is_file():
            raise DataError(f"{listing}: image {image['id']} ({image['file_name']}) is listed but {file} does not "
                            "exist; add it or remove it from the annotations")
        width, height = image.get("width"), image.get("height")
        if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
            width, height = _header_size(file)
        sizes[image["id"]] = (int(width), int(height))
        images.append({**image, "width": int(width), "height": int(height)})
        payloads.append(file.read_bytes())
    if not images:
        raise DataError(f"detection set {root} holds no images: {listing} lists none")

    annotations, ids = [], set()
    for number, annotation in enumerate(data.get("annotations", []), 1):
        name = f"annotation {annotation.get('id', f'#{number}')}" if isinstance(annotation, dict) else \
            f"annotation #{number}"
        if not isinstance(annotation, dict):
            raise DataError(f"{listing}: {name} is not an object")
        if not _is_id(annotation.get("image_id")) or annotation["image_id"] not in sizes:
            raise DataError(f"{listing}: {name} names image {annotation.get('image_id')!r}, which is not among the "
                            "listed images")
        if not _is_id(annotation.get("category_id")) or annotation["category_id"] not in categories:
            raise DataError(f"{listing}: {name} names category {annotation.get('category_id')!r}, which is not "
                            "among the listed categories")
        box = annotation.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DataError(f"{listing}: {name} has bbox {box!r}; expected four numbers [x, y, width, height]")
        x, y, w, h = box
        width, height = sizes[annotation["image_id"]]
        if w < 0 or h < 0:
            raise DataError(f"{listing}: {name} has a negative width or height in bbox {box}")
        # a pixel of slack: tools round, and some count the last pixel as inside
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            raise DataError(f"{listing}: {name} has bbox {box} outside its {width}×{height} image "
                            f"{annotation['image_id']}; boxes are [x, y, width, height] in the image's pixels")
        if "id" in annotation:
            if not _is_id(annotation["id"]) or annotation["id"] in ids:
                raise DataError(f"{listing}: {name} has an id that is not a unique integer; ids must be unique")
            ids.add(annotation["id"])
        annotations.append({**annotation, "area": annotation.get("area", w * h),
                            "iscrowd": annotation.get("iscrowd", 0)})
    if not annotations:
        raise DataError(f"detection set {root} holds no annotations: {listing} needs at least one box to measure")
    free = (n for n in range(max(ids, default=0) + 1, 1 << 62))
    annotations = [a if "id" in a else {**a, "id": next(free)} for a in annotations]

    coco = {**data, "images": images, "annotations": annotations, "categories": list(data["categories"])}
    return DetectionSet(root, payloads, [image["id"] for image in images],
                        [sizes[image["id"]] for image in images], coco, categories)


def read_segmentation_eval(root: Path) -> SegmentationSet:
    """A segmentation set: ``<root>/images/<stem>.<ext>`` and its mask ``<root>/masks/<stem>.png``."""
    root = Path(root)
    folders = {name: root / name for name in ("images", "masks")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"segmentation set {root} has no {name}/ folder: expected <root>/images/<name>.<ext> "
                            "and <root>/masks/<name>.png")
    images: dict[str, Path] = {}
    for file in _files(folders["images"]):
        if file.stem in images:
            raise DataError(f"segmentation set {root}: images {images[file.stem].name} and {file.name} share the "
                            "name their mask is found by; rename one")
        images[file.stem] = file
    masks: dict[str, Path] = {}
    for file in _files(folders["masks"]):
        if file.suffix.lower() != ".png":
            raise DataError(f"mask {file} is not a PNG: save each mask as a PNG of class indices, "
                            "masks/<image name>.png")
        masks[file.stem] = file
    unmasked = sorted(set(images) - set(masks))
    if unmasked:
        raise DataError(f"segmentation set {root}: no mask for {_listed([images[s].name for s in unmasked])}; "
                        "add masks/<name>.png for each")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"segmentation set {root}: no image for {_listed([masks[s].name for s in orphans])}; add "
                        "the image or remove the mask")
    if not images:
        raise DataError(f"segmentation set {root} holds no images")

    names, payloads, arrays = sorted(images), [], []
    for stem in names:
        mask = _read_mask(masks[stem])
        size = _header_size(images[stem])
        if size != (mask.shape[1], mask.shape[0]):
            raise DataError(f"segmentation set {root}: image {images[stem].name} is {size[0]}×{size[1]} but its "
                            f"mask is {mask.shape[1]}×{mask.shape[0]}; a mask must be the size of its image")
        payloads.append(images[stem].read_bytes())
        arrays.append(mask)
    return SegmentationSet(root, payloads, names, arrays)


def _read_mask(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as image:
            kind, mode = image.format, image.mode
            if kind == "PNG" and mode in MASK_MODES:
                mask = np.array(image)  # a palette image gives its indices, not its colours
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"mask {file} is not an image Pillow can read ({error}); save it as a PNG") from None
    if kind != "PNG":
        raise DataError(f"mask {file} is a {kind}, not a PNG: save masks as PNG, which keeps class indices exact")
    if mode not in MASK_MODES:
        raise DataError(f"mask {file} has mode {mode}, not a single channel of class indices: save it as a "
                        "grey-scale (L) or palette (P) PNG whose values are the classes")
    return mask.astype(np.uint8) if mask.dtype == bool else mask


def read_multilabel_eval(path: Path) -> MultilabelSet:
    """A multi-label set: a CSV of ``image`` (relative to the CSV's folder) and ``labels`` (``a|b``; may be
    empty)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"multi-label set {path} does not exist: expected a .csv with columns image and labels")
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets start with a BOM
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "labels"} <= set(reader.fieldnames):
            raise DataError(f"{path}: a multi-label CSV needs columns 'image' and 'labels'; it has "
                            f"{reader.fieldnames}")
        rows = list(reader)
    payloads, images, labels = [], [], []
    for line, row in enumerate(rows, 2):
        image = (row["image"] or "").strip()
        if not image:
            raise DataError(f"{path}, line {line}: the image column is empty")
        file = path.parent / image
        if not file.is_file():
            raise DataError(f"{path}, line {line}: image {image} does not exist ({file}); paths are relative to the "
                            "CSV's folder")
        names = [name.strip() for name in (row["labels"] or "").split("|") if name.strip()]
        payloads.append(file.read_bytes())
        images.append(image)
        labels.append(list(dict.fromkeys(names)))
    if not images:
        raise DataError(f"multi-label set {path} holds no rows")
    return MultilabelSet(path, payloads, images, labels, sorted({name for names in labels for name in names}))
