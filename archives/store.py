"""The model store: built archives (``<model>_<version>.mar``) and ``manifest.json`` beside them.

The manifest records, for every built version: sha256 and size of the archive, the input fingerprint it was built
from, where the weights came from, the parity result and the held-out accuracy where one was measured. Whoever
registers an archive checks its sha256 here first.

Each archive is served from its unpacked copy, the folder ``<model>_<version>/`` beside it (``unpacked``): given
an archive, TorchServe extracts it on its frontend's main thread, one archive after another, before its APIs answer
and before any worker starts (5-8 s for minilm's 180 MB on 2 busy cores); given a folder in the model store, it
links it. The folder holds ``.sha256``, the archive it was unpacked from; a folder that does not match its archive is
unpacked again. The archive stays the versioned artifact; the folder is a cache of it.

Builds and imports run at the same time, in processes of their own, into one store: an archive is written under a
unique hidden name in the store and renamed into place together with its manifest entry, under an exclusive lock
(``locked``, fcntl.flock on the store's folder itself: no lock file lands beside the archives, in a KServe storage
folder or an image) in which the manifest is read again and only that entry changes.
Every file here is replaced whole (``replace_file``: a unique temporary file beside it, then os.replace), so a reader
never needs the lock: it sees the file before or after a change, never half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
UNPACKED_STAMP = ".sha256"  # in an unpacked archive: the sha256 of the archive it was unpacked from
TEMPORARY_SUFFIX = ".tmp"  # a file being written under a unique hidden name, before it is renamed into place


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


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for the block, shared by every process that locks it: a lock file (created if
    missing) or a folder. fcntl.flock, released when its descriptor closes, so also when the process dies."""
    descriptor = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def temporary_beside(path: Path) -> Path:
    """A new empty file with a unique hidden name in ``path``'s folder (``.<name>.<random>.tmp``): written there and
    renamed onto ``path``, it never crosses a file system, so the rename is atomic. Its mode is what the umask gives
    a new file (tempfile's are private to their owner; an archive or a manifest is not)."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue  # another writer's name: draw again


def replace_file(path: Path, text: str, check: Callable[[Path], object] | None = None) -> None:
    """``path`` replaced whole by ``text`` (written beside it, then os.replace): a reader sees the old file or the new
    one. ``check``, given the written file, may raise to refuse it; then ``path`` is left as it was."""
    temporary = temporary_beside(path)
    try:
        temporary.write_text(text)
        if check is not None:
            check(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Manifest:
    """The store's manifest as read when made (``models``: model → version → entry). Changes go through ``record``
    and ``save``, which read the file again under the store's lock and change only their own entries: two processes
    that record at once keep both."""

    def __init__(self, store: Path | None = None):
        self.store = Path(store or default_store())
        self.path = self.store / MANIFEST
        self.models: dict[str, dict[str, dict[str, Any]]] = self._read()

    def _read(self) -> dict[str, dict[str, dict[str, Any]]]:
        return json.loads(self.path.read_text())["models"] if self.path.exists() else {}

    def get(self, model: str, version: str) -> dict[str, Any] | None:
        return self.models.get(model, {}).get(version)

    def entries(self) -> list[dict[str, Any]]:
        return [entry for versions in self.models.values() for entry in versions.values()]

    def record(self, entry: dict[str, Any], archive: Path | None = None) -> None:
        """One version's entry written into the manifest on disk; the others there are kept as they are now.
        ``archive``: the version's archive, written under a temporary name in the store, renamed to
        ``entry["archive"]`` under the same lock, so the archive in place and its entry always match."""
        with self._changing() as models:
            if archive is not None:
                os.replace(archive, self.store / entry["archive"])
            models.setdefault(entry["model"], {})[entry["version"]] = entry

    def save(self) -> None:
        """Every entry this manifest holds written over the manifest on disk; the entries only there are kept."""
        with self._changing() as models:
            for model, versions in self.models.items():
                models.setdefault(model, {}).update(versions)

    @contextmanager
    def _changing(self) -> Iterator[dict[str, dict[str, dict[str, Any]]]]:
        """The manifest on disk, read under the store's lock, to change in the block; written back whole at its end
        (and held here from then on)."""
        self.store.mkdir(parents=True, exist_ok=True)
        with locked(self.store):
            models = self._read()
            yield models
            ordered = {m: dict(sorted(v.items())) for m, v in sorted(models.items())}
            replace_file(self.path, json.dumps({"models": ordered}, indent=2) + "\n")
            self.models = models

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

    def built(self, model: str, version: str) -> dict[str, Any]:
        """The manifest entry of a built version; ValueError when it is not built."""
        entry = self.get(model, version)
        if entry is None:
            known = sorted(self.models.get(model, {}))
            raise ValueError(f"{model} {version} is not built (manifest {self.path} knows "
                             f"{'versions ' + ', '.join(known) if known else 'no versions of it'})")
        return entry

    def verify(self, model: str, version: str) -> tuple[Path, dict[str, Any]]:
        """The archive of a built version, after checking its sha256; ValueError says what is wrong."""
        entry = self.built(model, version)
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
        load without extracting; unpacked again if it is missing or was unpacked from another archive. A sealed
        store (the serving image's, read-only) holds the unpacked folders alone: a folder whose stamp names the
        manifest's sha256 is served as it is, without an archive to hash again at every start."""
        entry = self.built(model, version)
        archive = self.store / entry["archive"]
        folder = archive.with_suffix("")
        stamp = folder / UNPACKED_STAMP
        stamped = stamp.exists() and stamp.read_text() == entry["sha256"]
        if stamped and not archive.exists():
            return folder
        self.verify(model, version)
        if stamped:
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.store))
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(staging)
        (staging / UNPACKED_STAMP).write_text(entry["sha256"])
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder
