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
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".csv", ".jsonl")
SKIPPED = {".DS_Store", "Thumbs.db"}


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


def is_image_folder(path: Path) -> bool:
    return Path(path).is_dir()


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
        by_name = {}
        for index, name in labels.items():
            for alias in name if isinstance(name, list) else [name]:
                by_name.setdefault(str(alias), int(index))
        unknown = sorted({c for c in self.classes if c not in by_name and not (c.isdigit() and c in labels)})
        if unknown:
            shown = ", ".join(label_names(labels)[:8])
            raise DataError(f"the classes of {self.path} are not the model's labels: {', '.join(unknown[:8])}"
                            f"{' ...' if len(unknown) > 8 else ''} not among its {len(labels)} labels ({shown}"
                            f"{' ...' if len(labels) > 8 else ''})")
        return [by_name[c] if c in by_name else int(c) for c in self.classes]


def read_eval(path: Path) -> EvalSet:
    """An evaluation set: an image folder, a CSV or a JSONL file (see the module docstring)."""
    path = Path(path)
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
