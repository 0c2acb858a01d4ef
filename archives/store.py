"""The model store: built archives (``<model>_<version>.mar``) and ``manifest.json`` beside them.

The manifest records, for every built version: sha256 and size of the archive, the input fingerprint it was built
from, where the weights came from, the parity result and the held-out accuracy where one was measured. Whoever
registers an archive checks its sha256 here first.

Each archive is served from its unpacked copy, the folder ``<model>_<version>/`` beside it (``unpacked``): given
an archive, TorchServe extracts it on its frontend's main thread, one archive after another, before its APIs answer
and before any worker starts (5-8 s for minilm's 180 MB on 2 busy cores); given a folder in the model store, it
links it. The folder holds ``.sha256``, the archive it was unpacked from; a folder that does not match its archive is
unpacked again. The archive stays the versioned artifact; the folder is a cache of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
UNPACKED_STAMP = ".sha256"  # in an unpacked archive: the sha256 of the archive it was unpacked from


def default_store() -> Path:
    return Path(os.environ.get("MODEL_STORE", REPO / "model_store"))


def link_or_copy(source: Path, target: Path) -> None:
    """An archive placed elsewhere: a hard link where it can (archives are large and never change once built), else
    a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def store_of(folder: Path, versions: list[tuple[str, str]], source: "Manifest | None" = None) -> Path:
    """A model store holding only ``versions`` (model, version) of ``source`` (default: the built store), as hard
    links (copies across file systems), with their manifest entries: for an instance of its own."""
    source = source or Manifest()
    folder.mkdir(parents=True)
    manifest = Manifest(folder)
    for model, version in versions:
        entry = source.get(model, version)
        link_or_copy(source.store / entry["archive"], folder / entry["archive"])
        manifest.record(entry)
    manifest.save()
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Manifest:
    def __init__(self, store: Path | None = None):
        self.store = Path(store or default_store())
        self.path = self.store / MANIFEST
        self.models: dict[str, dict[str, dict[str, Any]]] = (
            json.loads(self.path.read_text())["models"] if self.path.exists() else {}
        )

    def get(self, model: str, version: str) -> dict[str, Any] | None:
        return self.models.get(model, {}).get(version)

    def entries(self) -> list[dict[str, Any]]:
        return [entry for versions in self.models.values() for entry in versions.values()]

    def record(self, entry: dict[str, Any]) -> None:
        self.models.setdefault(entry["model"], {})[entry["version"]] = entry
        self.save()

    def save(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        ordered = {m: dict(sorted(v.items())) for m, v in sorted(self.models.items())}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"models": ordered}, indent=2) + "\n")
        tmp.replace(self.path)

    def measured(self, model: str, version: str) -> list[dict[str, Any]]:
        """A built version's accuracy records: on its own evaluation set, and on the default version's set it was
        measured on too."""
        entry = self.get(model, version) or {}
        records = (entry.get("accuracy"), (entry.get("against_default") or {}).get("accuracy"))
        return [record for record in records if record and "eval_set" in record]

    def accuracy_on(self, model: str, version: str, digest: str) -> float | None:
        """A built version's top-1 on the evaluation set ``digest``, if it was measured on it."""
        return next((r["held_out"] for r in self.measured(model, version) if r["eval_set"]["sha256"] == digest), None)

    def compare_accuracy(self, model: str, version: str, other: str) -> tuple[str, float, float] | None:
        """(evaluation set, top-1 of ``version``, top-1 of ``other``) on a set both were measured on, or None."""
        for record in self.measured(model, other):
            mine = self.accuracy_on(model, version, record["eval_set"]["sha256"])
            if mine is not None:
                return record["eval_set"]["name"], mine, record["held_out"]
        return None

    def verify(self, model: str, version: str) -> tuple[Path, dict[str, Any]]:
        """The archive of a built version, after checking its sha256; ValueError says what is wrong."""
        entry = self.get(model, version)
        if entry is None:
            known = sorted(self.models.get(model, {}))
            raise ValueError(f"{model} {version} is not built (manifest {self.path} knows "
                             f"{'versions ' + ', '.join(known) if known else 'no versions of it'})")
        archive = self.store / entry["archive"]
        if not archive.exists():
            raise ValueError(f"{archive} is missing; rebuild it with: make archive MODEL={model} VERSION={version}")
        actual = sha256_file(archive)
        if actual != entry["sha256"]:
            raise ValueError(f"{archive} was altered since it was built: sha256 {actual[:12]}... "
                             f"!= manifest {entry['sha256'][:12]}...")
        return archive, entry

    def unpacked(self, model: str, version: str) -> Path:
        """The verified archive of a built version unpacked beside it (``<model>_<version>/``), for TorchServe to
        load without extracting; unpacked again if it is missing or was unpacked from another archive."""
        archive, entry = self.verify(model, version)
        folder = archive.with_suffix("")
        stamp = folder / UNPACKED_STAMP
        if stamp.exists() and stamp.read_text() == entry["sha256"]:
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.store))
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(staging)
        (staging / UNPACKED_STAMP).write_text(entry["sha256"])
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder
