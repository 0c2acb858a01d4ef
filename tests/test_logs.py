"""Bounded disk, and what a stranger can move or see, on a real TorchServe, front door and helpers (serve.sh) whose
logs rotate at a tiny size (``LOG_MAX_BYTES``):

* nginx's access log rotates at its size (renamed by the health checker, nginx reopens it on USR1), at most
  ``LOG_BACKUPS`` rotated files are kept, and the front door's metrics count every request once across the
  rotations; the health checker's own log rotates (RotatingFileHandler) with its stderr following it;
  ``torchserve.out`` is copied and truncated in place, its writer appending;
* the rate the autoscaler reads (``frontdoor_forwarded_requests_total``) counts the requests that passed the key
  check, not a stranger's 401s;
* ``/health/*`` names models and versions only to a caller with the inference key;
* every file the instance writes into LOG_DIR is a log the pod's /tmp budget counts, SERVE_HOME's own files fit its
  allowance, and nginx never spools a request body to disk.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from archives.store import store_of
from deploy import contract
from export import digits
from export.samples import encode
from serving.health import KEY_HEADER
from serving.instance import Instance
from serving.logs import (
    ACCESS_LOG,
    CONSOLE_LOG,
    ERROR_LOG,
    Cap,
    all_caps,
    copy_truncate,
    rotate_renamed,
    rotated,
    truncate_stuck,
)
from serving.torchserve import TorchServe
from tests.conftest import REPO, instance, manage, ok

integration = pytest.mark.integration

MAX_BYTES = 300  # every log the toolkit rotates: a line or two of the access log
BACKUPS = 2
RATE = 20  # access log lines a second the rotation test writes
LINE_BYTES = 400  # the longest access log line it writes, with room
SETTLE = 10.0  # seconds for the access log's lines to be counted (flushed every 1 s, read every 0.5 s)
COUNTED = re.compile(r"^(frontdoor_\w+_total)\{(.*)\} (\S+)$")


@pytest.fixture(scope="module")
def tiny():
    """digits 2.0 on a TorchServe of its own, every toolkit log rotating at MAX_BYTES. Its folder is
    reachable by anyone: run as root, nginx's workers run as nobody and reopen the logs themselves (pytest's own
    temporary folders are private to their owner)."""
    home = Path(tempfile.mkdtemp(prefix="toolkit-logs-"))
    home.chmod(0o755)
    env = {**Instance.fresh(home / "serve").environment(), "MODEL_STORE": str(store_of(home / "store", [("digits", "2.0")])),
           "LOG_MAX_BYTES": str(MAX_BYTES), "LOG_BACKUPS": str(BACKUPS)}
    try:
        with instance(env):
            client = TorchServe()
            yield {"env": env, "logs": Path(env["LOG_DIR"]), "client": client, "key": client.token("inference")}
    finally:
        shutil.rmtree(home)


def counts(env: dict[str, str]) -> Counter:
    """(metric, its labels as written) → value, of the front door's own counters."""
    text = requests.get(f"{env['PROXY_METRICS_ADDRESS']}/metrics/front_door", timeout=30).text
    found: Counter = Counter()
    for line in text.splitlines():
        match = COUNTED.match(line)
        if match:
            found[match.group(1), match.group(2)] = float(match.group(3))
    return found


def series(api: str, version: str, status: str) -> str:
    return f'api="{api}",model="digits",retried="false",status="{status}",version="{version}"'


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


@integration
def test_the_access_log_rotates_at_its_size_and_every_request_is_counted_once(tiny):
    env, logs = tiny["env"], tiny["logs"]
    url = f"{env['PROXY_ADDRESS']}/predictions/digits/2.0"
    png = encode(digits.held_out()[0][0], "PNG")
    before = counts(env)
    sent: Counter = Counter()
    files = [inode(logs / ACCESS_LOG)]  # each access log nginx wrote, as the rotations replace it
    deadline = time.monotonic() + 40
    with requests.Session() as session:
        # a key's prediction and a stranger's, RATE lines a second, until the access log has been replaced 4 times
        while time.monotonic() < deadline and (sent[200] < 10 or len(files) < 5):
            started = time.monotonic()
            answered = session.post(url, data=png, headers={"Authorization": f"Bearer {tiny['key']}"}, timeout=30)
            refused = session.post(url, data=png, timeout=30)
            sent[answered.status_code] += 1
            sent[refused.status_code] += 1
            if inode(logs / ACCESS_LOG) not in (files[-1], None):
                files.append(inode(logs / ACCESS_LOG))
            time.sleep(max(0.0, 2 / RATE - (time.monotonic() - started)))
    assert set(sent) == {200, 401} and len(files) >= 5, (sent, files, os.listdir(logs))
    assert "rotated proxy-access.log at " in "".join(p.read_text() for p in logs.glob("health.log*"))

    expected = {("frontdoor_requests_total", series("predictions", "2.0", "200")): sent[200],
                ("frontdoor_requests_total", series("predictions", "", "401")): sent[401],
                ("frontdoor_forwarded_requests_total", series("predictions", "2.0", "200")): sent[200],
                ("frontdoor_forwarded_requests_total", series("predictions", "", "401")): 0}
    settle = time.monotonic() + SETTLE
    while True:
        after = counts(env)
        grown = {key: after[key] - before[key] for key in expected}
        if grown == expected or time.monotonic() > settle:
            break
        time.sleep(0.3)
    # each request once, though its line was read from a file renamed away; the autoscaler's count has no 401
    assert grown == expected, (grown, expected)

    # rotated at its size: each rotated file reached it, and holds no more than three seconds of this traffic (the
    # checker rotates within 1.5 s of the size; the rest is room for a busy machine); LOG_BACKUPS rotated files
    files = sorted(logs.glob(f"{ACCESS_LOG}*"))
    assert [p.name for p in files] == [ACCESS_LOG] + [rotated(Path(ACCESS_LOG), n).name
                                                      for n in range(1, BACKUPS + 1)], files
    for path in files[1:]:
        assert MAX_BYTES <= path.stat().st_size <= MAX_BYTES + 3 * RATE * LINE_BYTES, (path, path.stat())


@integration
def test_the_helpers_log_rotates_and_its_stderr_follows(tiny):
    logs = tiny["logs"]
    assert rotated(logs / "health.log", 1).exists(), os.listdir(logs)  # the rotations above are logged
    assert not rotated(logs / "health.log", BACKUPS + 1).exists()
    assert all(path.stat().st_size <= MAX_BYTES for path in logs.glob("health.log*"))
    # the checker's stdout and stderr are the current file, not one renamed away
    pid = Instance.at(Path(tiny["env"]["SERVE_HOME"])).pids()["health checker"]
    for fd in (1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == str(logs / "health.log")


@integration
def test_torchserve_out_is_copied_and_truncated_under_an_appending_writer(tiny):
    logs = tiny["logs"]
    # TorchServe's launcher and JVM write more than MAX_BYTES as it starts: the health checker has rotated it since
    deadline = time.monotonic() + 5
    while not rotated(logs / CONSOLE_LOG, 1).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    copied, current = rotated(logs / CONSOLE_LOG, 1).read_bytes(), (logs / CONSOLE_LOG).read_bytes()
    assert copied.startswith(b"Warning: TorchServe is using non-default JVM parameters"), copied[:200]
    assert b"Model server started" in copied + current
    # lines written after a truncation start at the beginning of the file: no hole of NULs where the old end was
    assert len(current) < MAX_BYTES and b"\0" not in current, current
    # the JVM's stdout is the file itself, opened to append: after a truncation its next line goes to the start
    java = Instance.at(Path(tiny["env"]["SERVE_HOME"])).pids()["frontend"]
    assert os.readlink(f"/proc/{java}/fd/1") == str(logs / CONSOLE_LOG)
    flags = next(line for line in Path(f"/proc/{java}/fdinfo/1").read_text().splitlines() if line.startswith("flags"))
    assert int(flags.split()[1], 8) & os.O_APPEND


@integration
def test_health_names_versions_only_to_a_caller_with_the_key(tiny):
    env = tiny["env"]
    ready = f"{env['PROXY_ADDRESS']}/health/ready"
    keyed = requests.get(ready, headers={"Authorization": f"Bearer {tiny['key']}"}, timeout=30).json()
    assert set(keyed["versions"]) == {"digits/2.0"}, keyed
    strangers = ({}, {KEY_HEADER: "1"}, {"Authorization": "Bearer not-the-key", KEY_HEADER: "1"})
    for headers in strangers:  # no key, a forged header, a wrong key
        for probe in ("ready", "live"):
            answer = requests.get(f"{env['PROXY_ADDRESS']}/health/{probe}", headers=headers, timeout=30)
            assert answer.status_code == 200 and "digits" not in answer.text and "versions" not in answer.json()
            assert "error" not in answer.json(), answer.text
    # the checker asked directly on loopback (serve.sh, the v2 gateway) is told everything
    assert set(requests.get(f"{env['HEALTH_ADDRESS']}/ready", timeout=30).json()["versions"]) == {"digits/2.0"}

    info = next(i for i in tiny["client"].versions("digits") if i["modelVersion"] == "2.0")
    ok(manage("scale", "digits", "2.0", "--min", "0", "--max", "0"))
    try:
        deadline = time.monotonic() + 10
        while requests.get(ready, timeout=30).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        stranger = requests.get(ready, timeout=30)
        assert stranger.status_code == 503 and "digits" not in stranger.text, stranger.text
        assert stranger.json()["not_ready"] == ["1 version that takes traffic is not ready (a caller with the "
                                                "inference key is told which)"]
        keyed = requests.get(ready, headers={"Authorization": f"Bearer {tiny['key']}"}, timeout=30).json()
        assert keyed["not_ready"] == ["digits 2.0: 0 of 1 workers READY"], keyed
    finally:  # its worker comes back while the tests go on (nothing after this needs it)
        tiny["client"].management("PUT", f"/models/digits/2.0?min_worker={info['minWorkers']}"
                                         f"&max_worker={info['maxWorkers']}", ok=(200, 202))


@integration
def test_every_log_is_budgeted_and_the_state_fits_its_allowance(tiny):
    env, logs = tiny["env"], tiny["logs"]
    # a body of 2 MiB, read whole before it is passed on: held in memory, never spooled to nginx's temp folder (the
    # budget counts none); TorchServe answers 404 for a model it does not serve, without a worker
    body = requests.post(f"{env['PROXY_ADDRESS']}/predictions/no_such_model", data=b"\0" * 2**21, timeout=30,
                         headers={"Authorization": f"Bearer {tiny['key']}"})
    assert body.status_code == 404, body.text
    time.sleep(1.5)
    errors = "".join(path.read_text() for path in logs.glob(f"{ERROR_LOG}*"))
    assert "buffered to a temporary file" not in errors, errors

    budgeted = all_caps(env)
    for path in logs.iterdir():  # each file a budgeted log or one of its rotations (log4j2's: <name>.<n>.log.gz)
        base = re.sub(r"\.\d+$", "", path.name)
        base = re.sub(r"\.\d+\.log\.gz$", ".log", base)
        assert base in budgeted, (path.name, sorted(budgeted))
    # what serve.sh's processes keep in SERVE_HOME besides the logs, under the budget's allowance
    state = sum(os.lstat(Path(folder) / name).st_size for folder, _, names in os.walk(env["SERVE_HOME"])
                if not Path(folder).is_relative_to(logs) for name in names)
    assert 0 < state < contract.STATE_BYTES / 10, state


def test_the_budget_names_every_log_the_configurations_write():
    """The names of the logs in serving/nginx.conf.j2, serve.sh and log4j2.xml, as those files write them."""
    nginx = (REPO / "serving" / "nginx.conf.j2").read_text()
    serve = (REPO / "serve.sh").read_text()
    written = set(re.findall(r"(?:access_log|error_log) \{\{ logs \}\}/(\S+?)[ ;]", nginx))
    written |= set(re.findall(r'"\$LOG_DIR/([\w.-]+)"', serve)) - {"model_log.log", "ts_log.log"}  # read, not written
    written |= {f"{helper}.log" for helper in re.findall(r"^\s*start_helper (\w+)$", serve, re.MULTILINE)}
    written |= {Path(name).name for name in re.findall(r'fileName="\$\{dir\}/([^"]+)"',
                                                        (REPO / "log4j2.xml").read_text())}
    assert {ACCESS_LOG, ERROR_LOG, CONSOLE_LOG, "health.log", "v2.log", "ts_log.log"} <= written, written
    assert written <= set(all_caps({})), written - set(all_caps({}))


# --- the rotations, each with a real writer that appends --------------------------------------------------------

WRITER = """
import sys, time
with open(sys.argv[1], "a", buffering=1) as log:
    for number in range(int(sys.argv[2])):
        log.write(f"line {number:04d} " + "x" * 40 + "\\n")
        time.sleep(0.002)
"""


def appending(path: Path, lines: int) -> subprocess.Popen:
    """A process that appends ``lines`` lines of 50 bytes to ``path`` and never reopens it (as serve.sh's >>)."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(lines)])


def test_a_writer_that_never_reopens_is_truncated_in_place_at_its_bound(tmp_path):
    log = tmp_path / "proxy-access.log"
    cap = Cap(max_bytes=1000, backups=2, how="test", overshoot=1000)
    log.write_bytes(b"x" * 1000)
    with open(log, "ab") as nginx:  # a worker that will not reopen
        assert rotate_renamed(log, cap, reopen=lambda: None) == 1000
        assert not log.exists() and rotated(log, 1).stat().st_size == 1000
        nginx.write(b"y" * 500)
        nginx.flush()
        assert truncate_stuck(log, cap) == 0  # within what a rotation explains
        nginx.write(b"y" * 600)
        nginx.flush()
        assert truncate_stuck(log, cap) == 2100 and rotated(log, 1).stat().st_size == 0
        nginx.write(b"z\n")
        nginx.flush()
    assert rotated(log, 1).read_bytes() == b"z\n"  # it appends: no hole where the old end was


def test_copy_truncate_keeps_its_backups_and_the_writer_appends_from_the_start(tmp_path):
    log = tmp_path / "torchserve.out"
    cap = Cap(max_bytes=2000, backups=2, how="test")
    writer = appending(log, 400)  # 20,000 bytes
    rotations = 0
    while writer.poll() is None:
        rotations += bool(copy_truncate(log, cap))
        time.sleep(0.01)
    assert writer.returncode == 0 and rotations >= 3, rotations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchserve.out", "torchserve.out.1", "torchserve.out.2"]
    for path in tmp_path.iterdir():
        text = path.read_bytes()
        assert b"\0" not in text and text.startswith(b"line "), (path, text[:80])  # whole lines from the start
    numbers = [int(line.split()[1]) for line in (rotated(log, 2).read_text() + rotated(log, 1).read_text()
                                                  + log.read_text()).splitlines()]
    assert numbers == sorted(numbers) and numbers[-1] == 399  # the newest lines, in order
