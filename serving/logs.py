"""Every log the toolkit writes, each bounded by size: the one place that says how large each may grow and how many
rotated files are kept, and the code that rotates them.

serve.sh writes into ``LOG_DIR`` (in a pod, ``/tmp/logs`` on an emptyDir with a size limit, so a log that grows
without end gets the pod evicted). Who rotates what:

* TorchServe's own logs (``access_log.log``, ``model_log.log``, ``ts_log.log``, ``ts_metrics.log``): log4j2's
  RollingFile, by the sizes in ``log4j2.xml`` (read here by ``log4j_caps``, not repeated);
* the helpers' logs (``health.log``, ``v2.log``): Python's ``RotatingFileHandler`` (``log_to_file``), the process's
  stdout and stderr following the current file (a traceback, gRPC's C core writing to fd 2);
* nginx's ``proxy-access.log`` and ``proxy-error.log``: renamed to ``.1`` by the health checker once over their
  size, then nginx's master is sent USR1 and reopens them (``rotate_renamed``); nginx has no size limit of its own.
  Should its workers fail to reopen them (``truncate_stuck``), the renamed file is emptied in place at its bound;
* ``torchserve.out`` (TorchServe's launcher and the JVM's console, serve.sh's ``>>``, which nobody reopens): copied
  to ``.1`` and truncated in place by the health checker (``copy_truncate``); the writer appends (O_APPEND), so its
  next line lands at the start of the emptied file. A line written between the copy and the truncation is lost.

``LOG_MAX_BYTES`` and ``LOG_BACKUPS`` override the size and the number of rotated files of every log the toolkit
rotates itself (not log4j2's), e.g. for a test or a small disk; the pod's /tmp budget (``deploy/contract.py``) is
computed from the same ``toolkit_caps``, with the pod's environment.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOG4J_CONFIG = REPO / "log4j2.xml"
MIB = 2**20

ACCESS_LOG = "proxy-access.log"  # nginx's access log (serving/nginx.conf.j2), which the health checker also counts
ERROR_LOG = "proxy-error.log"  # nginx's error log (serving/nginx.conf.j2, and nginx -e)
CONSOLE_LOG = "torchserve.out"  # TorchServe's launcher and the JVM's stdout and stderr (serve.sh)
HELPERS = ("health", "v2")  # serve.sh's start_helper: python -m manage <name>, its log LOG_DIR/<name>.log

# Most a log the health checker rotates can pass its size by: what is written between its passing the size and
# its rotation, up to three of the checker's rounds (ROTATE_SECONDS; the access log waits for the file rotated
# before to settle), nginx's 64 KiB buffers included. 16 MiB is 1.5 s of about 40,000 access log lines a second, a
# flood of strangers' requests that nginx refuses itself.
CHECK_OVERSHOOT_BYTES = 16 * MIB
ROTATE_SECONDS = 0.5  # how often the health checker looks at the logs it rotates
LINE_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@dataclass(frozen=True)
class Cap:
    """How large one log may grow: ``max_bytes`` per file, and ``backups`` rotated files kept beside it. A file may
    pass its size by ``overshoot`` (what is written before its rotator looks again), and a rotation may hold
    ``in_flight`` more files for a moment (log4j2 compressing the file it rolled over)."""

    max_bytes: int
    backups: int
    how: str  # who rotates it
    overshoot: int = 0
    in_flight: int = 0

    @property
    def disk_bytes(self) -> int:
        """The most the log holds on disk, all its files together."""
        return (self.max_bytes + self.overshoot) * (1 + self.backups + self.in_flight)


# The toolkit's own logs: size per file and rotated files kept (the numbers LOG_MAX_BYTES / LOG_BACKUPS replace),
# who rotates it, and by how much it can pass its size. The access log is one line (~270 bytes) a request: 32 MiB is
# ~120,000 requests a file. RotatingFileHandler rotates before a line would pass the size.
TOOLKIT_LOGS = {
    ACCESS_LOG: (32 * MIB, 2, "the health checker: rename, USR1 to nginx", CHECK_OVERSHOOT_BYTES),
    ERROR_LOG: (8 * MIB, 2, "the health checker: rename, USR1 to nginx", CHECK_OVERSHOOT_BYTES),
    CONSOLE_LOG: (8 * MIB, 1, "the health checker: copy, truncate", CHECK_OVERSHOOT_BYTES),
    **{f"{name}.log": (8 * MIB, 2, "RotatingFileHandler", 0) for name in HELPERS},
}


def log_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where serve.sh writes its logs: ``LOG_DIR``, default ``logs/``."""
    return Path(env.get("LOG_DIR") or REPO / "logs")


def toolkit_caps(env: Mapping[str, str] = os.environ) -> dict[str, Cap]:
    """The logs the toolkit rotates itself, as ``env`` sets them (``LOG_MAX_BYTES``, ``LOG_BACKUPS``)."""
    caps = {}
    for name, (size, backups, how, overshoot) in TOOLKIT_LOGS.items():
        size = int(env.get("LOG_MAX_BYTES") or size)
        backups = int(env.get("LOG_BACKUPS") or backups)
        if size <= 0 or backups < 1:  # RotatingFileHandler never rotates without a backup
            raise ValueError(f"LOG_MAX_BYTES must be > 0 and LOG_BACKUPS >= 1, got {size} and {backups}")
        caps[name] = Cap(size, backups, how, overshoot=overshoot)
    return caps


# --- log4j2.xml: TorchServe's own logs -----------------------------------------------------------------------------

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}  # log4j2's FileSize: binary multiples
REFERENCE = re.compile(r"\$\{([^}]+)\}")


def _resolve(text: str, properties: dict[str, str]) -> str:
    """``${name}`` of log4j2.xml's Properties; anything else (an environment lookup) cannot be budgeted offline."""
    def lookup(match: re.Match) -> str:
        if match.group(1) not in properties:
            raise ValueError(f"{LOG4J_CONFIG.name}: cannot budget ${{{match.group(1)}}}: use a literal Property")
        return properties[match.group(1)]

    return REFERENCE.sub(lookup, text)


def log4j_caps(path: Path = LOG4J_CONFIG) -> dict[str, Cap]:
    """Each RollingFile of log4j2.xml: its SizeBasedTriggeringPolicy's size and DefaultRolloverStrategy's max. A
    rollover renames the full file and compresses it while the new one grows, so one more file of the size is on
    disk for a moment (``in_flight``); the compressed ones are counted at full size, the worst case."""
    root = ElementTree.parse(path).getroot()
    properties = {p.get("name"): p.text or "" for p in root.iter("Property")}
    caps = {}
    for appender in root.iter("RollingFile"):
        name = Path(_resolve(appender.get("fileName", ""), {**properties, "dir": ""})).name
        policy, strategy = appender.find(".//SizeBasedTriggeringPolicy"), appender.find("DefaultRolloverStrategy")
        if policy is None or strategy is None:
            raise ValueError(f"{path.name}: RollingFile {name} needs a SizeBasedTriggeringPolicy and a "
                             "DefaultRolloverStrategy (the pod's /tmp is budgeted from them)")
        size = SIZE.match(_resolve(policy.get("size", ""), properties))
        if size is None:
            raise ValueError(f"{path.name}: RollingFile {name}: size {policy.get('size')!r} is not a log4j size")
        max_bytes = int(float(size.group(1)) * UNITS[(size.group(2) or "B").upper()])
        kept = int(_resolve(strategy.get("max", "7"), properties))  # log4j2's default max is 7
        caps[name] = Cap(max_bytes, kept, "log4j2 RollingFile", in_flight=1)
    return caps


def all_caps(env: Mapping[str, str] = os.environ) -> dict[str, Cap]:
    """Every log serve.sh's processes write into LOG_DIR, by file name."""
    return {**log4j_caps(), **toolkit_caps(env)}


# --- rotation ------------------------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def rotated(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def _shift_rotated(path: Path, backups: int) -> None:
    """``path.N-1`` → ``path.N`` ... ``path.1`` → ``path.2``, ``path.<backups>`` removed: ``path.1`` is free."""
    rotated(path, backups).unlink(missing_ok=True)
    for number in range(backups - 1, 0, -1):
        if rotated(path, number).exists():
            rotated(path, number).replace(rotated(path, number + 1))


def shift(path: Path, backups: int) -> None:
    """``path`` → ``path.1``, each older one a number up; the one past ``backups`` is removed."""
    _shift_rotated(path, backups)
    if path.exists():
        path.replace(rotated(path, 1))


def rotate_renamed(path: Path, cap: Cap, reopen: Callable[[], None]) -> int:
    """When ``path`` has reached its size: rename it away and have its writer ``reopen`` it (nginx: USR1 to its
    master, which creates the file again). The size it rotated at (0: not due)."""
    size = _size(path)
    if size < cap.max_bytes:
        return 0
    shift(path, cap.backups)
    reopen()
    return size


def truncate_stuck(path: Path, cap: Cap) -> int:
    """After ``rotate_renamed``: when ``path.1`` has grown past what its rotation can explain (its size and
    overshoot), its writer never reopened ``path`` and still appends to the renamed file (nginx's workers run as
    ``nobody`` under root and cannot reach a private LOG_DIR): empty it in place, so the disk stays bounded. The size
    it had (0: not stuck)."""
    size = _size(rotated(path, 1))
    if size <= cap.max_bytes + cap.overshoot:
        return 0
    os.truncate(rotated(path, 1), 0)
    return size


def copy_truncate(path: Path, cap: Cap) -> int:
    """When ``path`` has reached its size: copy it to ``path.1`` and empty it in place, for a writer that never
    reopens its file (serve.sh's ``>>``, which appends: its next line goes to the start). The size it rotated at
    (0: not due)."""
    size = _size(path)
    if size < cap.max_bytes:
        return 0
    _shift_rotated(path, cap.backups)
    shutil.copyfile(path, rotated(path, 1))
    os.truncate(path, 0)
    return size


# --- the helpers' own logs ----------------------------------------------------------------------------------------


class FollowedFileHandler(RotatingFileHandler):
    """A RotatingFileHandler whose file is also the process's stdout and stderr, through every rotation: what is
    not logged (a traceback, a C library writing to fd 2) lands in the current file, not in a rotated one."""

    def follow(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        for fd in (1, 2):
            os.dup2(self.stream.fileno(), fd)

    def doRollover(self) -> None:  # noqa: N802 (logging's naming)
        super().doRollover()
        self.follow()


def log_to_file(helper: str, env: Mapping[str, str] = os.environ) -> FollowedFileHandler:
    """A serve.sh helper's logging (``python -m manage health``, ``python -m manage v2``): LOG_DIR/<helper>.log at
    INFO, rotated at its size (``TOOLKIT_LOGS``). Set up before the helper's own ``logging.basicConfig``, which then
    does nothing."""
    cap = toolkit_caps(env)[f"{helper}.log"]
    folder = log_dir(env)
    folder.mkdir(parents=True, exist_ok=True)
    handler = FollowedFileHandler(folder / f"{helper}.log", maxBytes=cap.max_bytes, backupCount=cap.backups)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    handler.follow()
    return handler
