"""``python -m load_test.soak [--minutes M] [--rate R] [--interval S] [--out DIR]``: a soak test of the running server.

One question: does the server stay healthy under a steady, realistic load for a long time? No errors, and no process
that keeps growing (memory, open files) or leaves files behind in its temp folder. It runs against the instance the
environment describes (``SERVE_HOME``, ``PROXY_ADDRESS``, ``TS_*``, as ``python -m manage`` reads them).

1. **Saturation**: a closed-loop burst (16 clients, each sending its next request as soon as its last is answered;
   12 s counted after 2 s) on the good requests of the mix below (a bad one may kill a worker, which would make the
   capacity look lower than it is). The steady load is 70 % of that rate unless ``--rate`` is given.
2. **Steady load**, open loop: a scheduler makes request i due at i / rate and hands it to a pool of client threads,
   so a slow server shows as latency (counted from when the request was due, waiting for a free client included),
   never as a lower rate. Through the front door (``Instance.front``; straight to TorchServe's
   inference API when nothing answers there, said on stderr and in soak.json). The mix: real photos to
   ``efficientnet_lite0`` (raw bytes and multipart uploads), held-out digit PNGs to ``digits``, sentences as JSON to
   ``minilm``, small photos to ``super_resolution`` (a model that is not registered is left out); one request in 100
   is a bad one, in turn: not an image, a 1x60000 PNG, an empty body, broken JSON, a truncated JPEG, an image over
   the pixel limit. A good request must be answered 200, a bad one 4xx.
3. **Samples**, every ``--interval`` seconds (default 5), while the load runs: for TorchServe's Java frontend, each of
   its workers (named by TorchServe's worker id, so a restart shows as a new pid under the same name), the health
   checker and nginx's master and workers (when their pid files exist): PSS and private memory
   (``/proc/<pid>/smaps_rollup``) and open descriptors (``/proc/<pid>/fd``); the size and file count of
   ``$SERVE_HOME/tmp``; the interval's answered req/s and p50/p99 latency of good requests. A line each on stderr.
4. **Summary**: after a warm-up (the first 20 % of the run or 1 minute, whichever is shorter), the growth per hour of
   every series, a least-squares slope over the samples (a restarted worker: over its last process only); worker
   restarts (a new pid under the same name; nginx's workers are replaced at each reload, as when the health checker
   renews the front door's keys); requests, errors by model and status with the first few answers, bad requests by
   case; latency.

Reading it. The verdict: the server kept up with the rate, zero errors on good requests, every bad request answered
4xx, PSS growth under 50 MB/h for every process, and no growth of open descriptors or of the temp folder.
Descriptors and temp files are judged by their floor (the lowest count of the last third of the window against the
lowest of the first third), because connections in flight come and go above it while a leak raises it. PSS splits
shared pages between the processes that map them, so it moves a little when unrelated processes start or stop
(another TorchServe on the same machine maps the same libraries); the private column does not, and a leak shows in
both. A short run extrapolates to an hour: a JVM heap still growing to its working size, or ONNX Runtime's arena
growing in steps as larger batches arrive, reads as hundreds of MB/h over a few minutes; trust the memory verdict
from runs of 30 minutes and more, and look in soak.png for a line that keeps climbing rather than one that levels
off. A server that falls behind the rate (answers under 95 % of it after the warm-up) builds queues and opens
connections as the backlog grows: that run is an overload test, not a soak, and its growth figures say little; give
a lower ``--rate``. Exit status 0 when every goal is met, 1 otherwise.

Output in ``--out`` (default ``load_test/results/``): ``soak.json`` (the settings, every sample and the summary) and
``soak.png`` (PSS of each process over time; answered req/s and p99 latency over time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import queue
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import requests

from serving.front_door import children
from serving.instance import REPO, Instance, ServeError
from serving.torchserve import TorchServe

RESULTS = REPO / "load_test" / "results"
WEIGHTS = {"efficientnet_lite0": 4, "digits": 3, "minilm": 2, "super_resolution": 1}  # shares of the good requests
BAD_EVERY = 100  # one request in 100 is a bad one
# 16 closed-loop clients, as many requests in flight as the steady load keeps: 4 measured 72-82 req/s for the same
# mix on 2 cores where 16 measured 50-56, and 70 % of the larger figure was more than the server sustains.
SATURATION_CLIENTS, SATURATION_SECONDS, SATURATION_WARMUP = 16, 12, 2
STEADY_SHARE = 0.7  # of the saturation rate
CLIENT_THREADS = 64  # the open loop's clients: at most this many requests in flight, the rest wait (counted in latency)
REQUEST_TIMEOUT = 60  # s
TOKEN_REREAD = 20  # s between reads of the key file (the client renews a key about to expire)
WARMUP_SHARE, WARMUP_MAX = 0.2, 60.0
GOAL_MB_PER_HOUR = 50.0
FD_SLACK = 2  # rise of the descriptor floor still counted as none
TMP_BYTES_SLACK = 1e6  # rise of the temp folder's floor, in bytes, still counted as none (no file may be added)
KEPT_UP = 0.95  # answered / asked rate below which the server fell behind
ERROR_BODIES = 5
FRONTEND = "frontend (java)"


# --- what is sent ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    model: str
    name: str  # for the report: "chelsea@0.5 multipart", "bad: empty body"
    body: bytes
    content_type: str = "application/octet-stream"
    multipart: bool = False
    bad: bool = False


def good_payloads(models: set[str]) -> dict[str, list[Payload]]:
    """model → real inputs for it, for each model of WEIGHTS in ``models``."""
    from export import super_resolution
    from export.samples import SENTENCES
    from load_test import inputs

    found: dict[str, list[Payload]] = {}
    if "efficientnet_lite0" in models:
        photos = inputs.photos()  # each photo at three sizes, JPEG
        found["efficientnet_lite0"] = (
            [Payload("efficientnet_lite0", name, body) for name, body in photos.items()]
            + [Payload("efficientnet_lite0", f"{name} multipart", body, "image/jpeg", multipart=True)
               for name, body in photos.items()])
    if "digits" in models:
        found["digits"] = [Payload("digits", f"digit {i}", body) for i, body in enumerate(inputs.digits())]
    if "minilm" in models:
        short = [text for name, text in SENTENCES.items() if name != "long"]
        found["minilm"] = (
            [Payload("minilm", f"text {name}", json.dumps({"text": text}).encode(), "application/json")
             for name, text in SENTENCES.items()]
            + [Payload("minilm", "7 texts", json.dumps({"texts": short}).encode(), "application/json")])
    if "super_resolution" in models:
        found["super_resolution"] = [Payload("super_resolution", f"{name} half size", low)
                                     for name, (_, low) in super_resolution.held_out(2).items()]
    return found


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_payloads(models: set[str]) -> list[Payload]:
    """Requests a correct server answers 4xx, for the models in ``models``, in the order they are sent."""
    from export.samples import encode, photo

    cases = [
        Payload("efficientnet_lite0", "bad: not an image", b"hello, this is not an image", bad=True),
        Payload("efficientnet_lite0", "bad: 1x60000 PNG", png(1, 60000), bad=True),
        Payload("digits", "bad: empty body", b"", bad=True),
        Payload("minilm", "bad: broken JSON", b'{"texts": ["A cat is sleeping', "application/json", bad=True),
        Payload("efficientnet_lite0", "bad: truncated JPEG", encode(photo("chelsea"))[:5000], bad=True),
        Payload("super_resolution", "bad: 2 MP, over the 1 MP limit", png(2000, 1000), bad=True),
    ]
    return [case for case in cases if case.model in models]


def request_mix(good: dict[str, list[Payload]], bad: list[Payload], seed: int) -> Iterator[Payload]:
    """The requests in order: a model drawn by WEIGHTS and one of its inputs at random; every BAD_EVERY-th request
    (from the 50th) the next bad case in turn."""
    rng = random.Random(seed)
    models = list(good)
    weights = [WEIGHTS[model] for model in models]
    bad_cases = itertools.cycle(bad)
    for i in itertools.count():
        if bad and i % BAD_EVERY == BAD_EVERY // 2:
            yield next(bad_cases)
        else:
            yield rng.choice(good[rng.choices(models, weights)[0]])


# --- sending ---------------------------------------------------------------------------------------------------------


class Result(NamedTuple):
    due: float  # s since the phase began: when the request was meant to leave
    latency: float  # s from due to the answer (or the failure)
    model: str
    name: str
    bad: bool
    status: int | str  # the HTTP status, or "timeout", "connection error", "no token"
    body: str  # the start of the answer when it was not 200


class Token:
    """The inference key, read again every TOKEN_REREAD seconds, or at once after the server refused it."""

    def __init__(self) -> None:
        self.client = TorchServe()
        self.lock = threading.Lock()
        self.value, self.read_at = "", float("-inf")

    def get(self, refresh: bool = False) -> str:
        with self.lock:
            if refresh or time.monotonic() - self.read_at > TOKEN_REREAD:
                self.value, self.read_at = self.client.token("inference"), time.monotonic()
            return self.value


class Sender:
    """Posts a payload on a client's keep-alive session and records the answer in ``results``."""

    def __init__(self, base_url: str, token: Token, results: list[Result]):
        self.base_url, self.token, self.results = base_url, token, results

    def post(self, session: requests.Session, payload: Payload) -> tuple[int | str, str]:
        url = f"{self.base_url}/predictions/{payload.model}"
        for attempt in range(2):
            try:
                headers = {"Authorization": f"Bearer {self.token.get(refresh=attempt > 0)}"}
            except ServeError as error:  # no key file, or the management API did not renew the key
                return "no token", str(error)[:300]
            if payload.multipart:
                kwargs = {"files": {"data": (f"{payload.name}.jpg", payload.body, payload.content_type)}}
            else:
                kwargs = {"data": payload.body}
                headers["Content-Type"] = payload.content_type
            try:
                response = session.post(url, headers=headers, timeout=REQUEST_TIMEOUT, **kwargs)
            except requests.Timeout:
                return "timeout", ""
            except requests.ConnectionError as error:
                return "connection error", str(error)[:300]
            refused = response.status_code == 401 or "InvalidKeyException" in response.text  # front door, TorchServe
            if refused and attempt == 0:
                continue  # the key was renewed meanwhile: once more with the new one
            return response.status_code, "" if response.status_code == 200 else response.text[:300]
        raise AssertionError("unreachable")

    def send(self, session: requests.Session, payload: Payload, due: float, start: float) -> None:
        status, body = self.post(session, payload)
        self.results.append(Result(due - start, time.monotonic() - due, payload.model, payload.name, payload.bad,
                                   status, body))


def client_session(base_url: str) -> requests.Session:
    session = requests.Session()
    if base_url.startswith("https") and os.environ.get("TLS_CERT"):
        session.verify = os.environ["TLS_CERT"]  # the front door's own certificate
    return session


def choose_target() -> tuple[str, str]:
    """(base URL, what it is): the front door, or TorchServe's inference API when nothing listens there."""
    front = Instance.current().front
    try:
        client_session(front).get(f"{front}/ping", timeout=5)
        return front, "front door"
    except requests.ConnectionError:
        inference = Instance.current().torchserve("inference")
        print(f"soak: nothing answers at the front door {front}: sending straight to TorchServe at {inference}",
              file=sys.stderr)
        return inference, "TorchServe's inference API: the front door did not answer"


def saturation(base_url: str, token: Token, mix: Iterator[Payload]) -> float:
    """Requests per second that SATURATION_CLIENTS closed-loop clients get answered."""
    results: list[Result] = []
    sender = Sender(base_url, token, results)
    lock = threading.Lock()
    start = time.monotonic()
    end = start + SATURATION_WARMUP + SATURATION_SECONDS

    def client() -> None:
        with client_session(base_url) as session:
            while time.monotonic() < end:
                with lock:
                    payload = next(mix)
                sender.send(session, payload, time.monotonic(), start)

    threads = [threading.Thread(target=client) for _ in range(SATURATION_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = Counter(f"{r.model} {r.status}" for r in results if r.status != 200)
    if failed:
        print(f"soak: answers other than 200 during the saturation burst: {dict(failed)}", file=sys.stderr)
    counted = [r for r in results if SATURATION_WARMUP <= r.due + r.latency <= SATURATION_WARMUP + SATURATION_SECONDS]
    return len(counted) / SATURATION_SECONDS


def steady(sender: Sender, mix: Iterator[Payload], rate: float, seconds: float, start: float) -> int:
    """Open loop: request i is due at start + i / rate, whatever became of the ones before it. CLIENT_THREADS
    clients, started first, take the requests from a queue in turn, each on its own session. When the time is up,
    the requests still waiting for a client are dropped (their number is returned) and those in flight answered."""
    jobs: queue.Queue = queue.Queue()

    def client() -> None:
        with client_session(sender.base_url) as session:
            while (job := jobs.get()) is not None:
                sender.send(session, *job, start)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(CLIENT_THREADS)]
    for thread in clients:
        thread.start()
    for i in range(int(seconds * rate)):
        due = start + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        jobs.put((next(mix), due))
    time.sleep(max(0.0, start + seconds - time.monotonic()))  # the end of the load: the last request is taken
    unsent = 0
    with contextlib.suppress(queue.Empty):
        while True:
            jobs.get_nowait()
            unsent += 1
    for _ in clients:
        jobs.put(None)
    for thread in clients:
        thread.join()
    return unsent


# --- sampling --------------------------------------------------------------------------------------------------------


def worker_id(pid: int) -> str | None:
    """TorchServe's id of a worker process: the port in its ``--sock-name .../.ts.sock.9000``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"--sock-name" not in args:
        return None
    return args[args.index(b"--sock-name") + 1].decode().rpartition(".")[2]


def watched(home: Path) -> dict[str, int]:
    """name → pid of each process watched: the Java frontend and its workers, the health checker and the v2 gateway
    (serve.sh's ``manage health`` and ``manage v2``), nginx's master and workers."""
    found = {}
    pids = Instance.at(home).pids()
    if java := pids.get("frontend"):
        found[FRONTEND] = java
        workers = sorted((wid, pid) for pid in children(java) if (wid := worker_id(pid)))
        found.update((f"worker {wid}", pid) for wid, pid in workers)
    found.update((name, pids[name]) for name in ("health checker", "v2 gateway") if name in pids)
    if master := pids.get("nginx master"):
        found["nginx master"] = master
        for number, pid in enumerate(children(master), 1):
            found[f"nginx worker {number}"] = pid
    return found


def memory(pid: int) -> dict[str, Any] | None:
    """PSS and private memory (MB) and open descriptors of a process; None when it is gone or a zombie."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.endswith("kB")}
    if "Pss" not in kib:
        return None
    return {"pid": pid, "pss_mb": round(kib["Pss"] * 1024 / 1e6, 2),
            "private_mb": round((kib["Private_Clean"] + kib["Private_Dirty"]) * 1024 / 1e6, 2), "fds": fds}


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) under a folder."""
    total = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass  # removed meanwhile
    return total, files


def worker_labels() -> dict[str, str]:
    """TorchServe's worker id → "model version", from its management API (empty if that does not answer)."""
    try:
        registered = TorchServe(timeout=10).registered()
    except (ServeError, requests.RequestException):
        return {}
    return {str(worker["id"]): f"{model} {version}" for (model, version), info in registered.items()
            for worker in info.get("workers", [])}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


class Sampler(threading.Thread):
    """Every ``interval`` seconds while the load runs: the watched processes, the temp folder, the interval's
    answers."""

    def __init__(self, home: Path, interval: float, start: float, seconds: float, results: list[Result]):
        super().__init__(daemon=True)
        self.home, self.interval, self.start_time, self.seconds = home, interval, start, seconds
        self.results = results
        self.samples: list[dict[str, Any]] = []
        self.labels = worker_labels()
        self.counted = 0  # results already in an interval
        self.errors = 0

    def run(self) -> None:
        for number in itertools.count(1):
            if number * self.interval > self.seconds + 1e-6:
                return
            time.sleep(max(0.0, self.start_time + number * self.interval - time.monotonic()))
            self.take()

    def take(self) -> None:
        now = time.monotonic() - self.start_time
        since = self.samples[-1]["t"] if self.samples else 0.0
        answered = self.results[self.counted:]
        self.counted += len(answered)
        self.errors += sum(not r.bad and r.status != 200 for r in answered)
        latencies = [r.latency for r in answered if not r.bad]
        processes = {name: found for name, pid in watched(self.home).items() if (found := memory(pid))}
        if any(name.startswith("worker ") and name[7:] not in self.labels for name in processes):
            self.labels.update(worker_labels())
        tmp_bytes, tmp_files = folder_size(self.home / "tmp")
        sample = {"t": round(now, 2), "answered": len(answered), "rps": round(len(answered) / (now - since), 2),
                  "p50_ms": ms(percentile(latencies, 0.5)), "p99_ms": ms(percentile(latencies, 0.99)),
                  "good_errors": self.errors, "tmp_bytes": tmp_bytes, "tmp_files": tmp_files,
                  "processes": processes}
        self.samples.append(sample)
        print(progress_line(sample), file=sys.stderr, flush=True)


def progress_line(sample: dict[str, Any]) -> str:
    def group(prefix: str) -> str:
        members = [p for name, p in sample["processes"].items() if name.startswith(prefix)]
        return (f"{len(members)} x {prefix.strip()} {sum(p['pss_mb'] for p in members):.0f} MB "
                f"{sum(p['fds'] for p in members)} fds")

    return " | ".join([
        f"[{sample['t']:5.0f} s] {sample['rps']:5.1f} req/s, p50 {fmt(sample['p50_ms'])} ms, "
        f"p99 {fmt(sample['p99_ms'])} ms, good errors {sample['good_errors']}",
        group("frontend"), group("worker "), group("nginx "),
        f"tmp {sample['tmp_files']} files {sample['tmp_bytes'] / 1e6:.1f} MB"])


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


# --- the summary -----------------------------------------------------------------------------------------------------


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600 if spread else None


def floor_rise(values: list[float]) -> float | None:
    """How far the lowest value of the last third rose above the lowest of the first third (None: under 3 values):
    what a leak raises, while connections in flight come and go above it."""
    if len(values) < 3:
        return None
    third = max(1, len(values) // 3)
    return min(values[-third:]) - min(values[:third])


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def process_growth(samples: list[dict[str, Any]], warmup: float) -> dict[str, dict[str, Any]]:
    """For each process seen: its pids (more than one: restarts), its last values, and after the warm-up, on its
    last pid: slopes per hour of PSS, private memory and descriptors, and the rise of the descriptor floor."""
    growth = {}
    for name in dict.fromkeys(name for sample in samples for name in sample["processes"]):
        seen = [(s["t"], s["processes"][name]) for s in samples if name in s["processes"]]
        pids = list(dict.fromkeys(p["pid"] for _, p in seen))
        fitted = [(t, p) for t, p in seen if p["pid"] == pids[-1] and t >= warmup]
        last = seen[-1][1]
        growth[name] = {
            "pids": pids, "restarts": len(pids) - 1, "samples": len(seen),
            "pss_mb": last["pss_mb"], "private_mb": last["private_mb"], "fds": last["fds"],
            **{f"{key}_per_hour": rounded(slope_per_hour([(t, p[key]) for t, p in fitted]))
               for key in ("pss_mb", "private_mb", "fds")},
            "fd_floor_rise": floor_rise([p["fds"] for _, p in fitted]),
        }
    return growth


def summarize(samples: list[dict[str, Any]], results: list[Result], unsent: int, labels: dict[str, str], rate: float,
              seconds: float, warmup: float, warmup_rule: str) -> dict[str, Any]:
    good = [r for r in results if not r.bad]
    bad = [r for r in results if r.bad]
    errors = [r for r in good if r.status != 200]
    errors_by, bad_by = defaultdict(Counter), defaultdict(Counter)
    for r in errors:
        errors_by[r.model][str(r.status)] += 1
    for r in bad:
        bad_by[r.name][str(r.status)] += 1
    bad_4xx = sum(isinstance(r.status, int) and 400 <= r.status < 500 for r in bad)
    measured = [r for r in good if r.due >= warmup]
    by_model = defaultdict(list)
    for r in measured:
        by_model[r.model].append(r.latency)
    answered_in_window = sum(warmup <= r.due + r.latency <= seconds for r in results)

    after = [s for s in samples if s["t"] >= warmup]
    processes = process_growth(samples, warmup)
    for name, info in processes.items():
        if name.startswith("worker "):
            info["label"] = labels.get(name[7:], "")
    summary = {
        "warmup_s": round(warmup, 1), "warmup_rule": warmup_rule,
        "window_s": round(after[-1]["t"] - after[0]["t"], 1) if after else 0.0,
        "rate": round(rate, 2), "achieved_rps": round(answered_in_window / (seconds - warmup), 2),
        "kept_up": answered_in_window / (seconds - warmup) >= KEPT_UP * rate,
        "requests": {"sent": len(results), "good": len(good), "bad": len(bad), "unsent": unsent},
        "good_errors": len(errors),
        "good_errors_by_model": {model: dict(statuses) for model, statuses in errors_by.items()},
        "error_bodies": [{"model": r.model, "input": r.name, "status": r.status, "body": r.body}
                         for r in errors[:ERROR_BODIES]],
        "bad_answered_4xx": bad_4xx, "bad_answered_other": len(bad) - bad_4xx,
        "bad_by_case": {name: dict(statuses) for name, statuses in bad_by.items()},
        "latency_ms": {"p50": ms(percentile([r.latency for r in measured], 0.5)),
                       "p99": ms(percentile([r.latency for r in measured], 0.99)),
                       "by_model": {model: {"p50": ms(percentile(v, 0.5)), "p99": ms(percentile(v, 0.99)),
                                            "answered": len(v)} for model, v in sorted(by_model.items())}},
        "processes": processes,
        "restarts": {name: info["restarts"] for name, info in processes.items() if info["restarts"]},
        "tmp": {"bytes": samples[-1]["tmp_bytes"] if samples else None,
                "files": samples[-1]["tmp_files"] if samples else None,
                "bytes_per_hour": rounded(slope_per_hour([(s["t"], s["tmp_bytes"]) for s in after]), 0),
                "files_per_hour": rounded(slope_per_hour([(s["t"], s["tmp_files"]) for s in after])),
                "bytes_floor_rise": floor_rise([s["tmp_bytes"] for s in after]),
                "files_floor_rise": floor_rise([s["tmp_files"] for s in after])},
    }
    summary["goals"] = goals(summary)
    summary["ok"] = all(goal["met"] for goal in summary["goals"])
    return summary


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: what it asks, what was measured, whether it was met."""
    processes, tmp = summary["processes"], summary["tmp"]
    pss = {name: p["pss_mb_per_hour"] for name, p in processes.items() if p["pss_mb_per_hour"] is not None}
    fds = {name: p["fd_floor_rise"] for name, p in processes.items() if p["fd_floor_rise"] is not None}
    worst_pss = max(pss, key=pss.get, default=None)
    worst_fds = max(fds, key=fds.get, default=None)
    return [
        {"goal": f"the server kept up (answered >= {KEPT_UP:.0%} of the rate after the warm-up)",
         "measured": f"{summary['achieved_rps']:.1f} of {summary['rate']:.1f} req/s", "met": summary["kept_up"]},
        {"goal": "zero errors on good requests",
         "measured": f"{summary['good_errors']} of {summary['requests']['good']}", "met": summary["good_errors"] == 0},
        {"goal": "every bad request answered 4xx",
         "measured": f"{summary['bad_answered_4xx']} of {summary['requests']['bad']}",
         "met": summary["bad_answered_other"] == 0},
        {"goal": f"PSS growth under {GOAL_MB_PER_HOUR:g} MB/h for every process",
         "measured": "too few samples" if worst_pss is None else f"highest {pss[worst_pss]:+.1f} MB/h ({worst_pss})",
         "met": bool(pss) and all(value < GOAL_MB_PER_HOUR for value in pss.values())},
        {"goal": f"no growth of open descriptors (floor rise <= {FD_SLACK} per process)",
         "measured": "too few samples" if worst_fds is None else f"highest {fds[worst_fds]:+d} ({worst_fds})",
         "met": bool(fds) and all(value <= FD_SLACK for value in fds.values())},
        {"goal": "no growth of the temp folder (floor: no file added, under 1 MB more)",
         "measured": "too few samples" if tmp["files_floor_rise"] is None else
         f"{tmp['files_floor_rise']:+d} files, {tmp['bytes_floor_rise'] / 1e6:+.2f} MB",
         "met": tmp["files_floor_rise"] is not None and tmp["files_floor_rise"] <= 0
         and tmp["bytes_floor_rise"] < TMP_BYTES_SLACK},
    ]


def report(run: dict[str, Any]) -> str:
    """The summary as printed at the end."""
    s = run["summary"]
    lines = [
        f"soak: {run['minutes']:g} min at {run['rate']:.1f} req/s ({run['rate_source']}; saturation "
        f"{run['saturation_rps']:.1f} req/s) to {run['target']} ({run['target_kind']})",
        f"warm-up: the first {s['warmup_s']:.0f} s ({s['warmup_rule']}); growth fitted over the {s['window_s']:.0f} s "
        f"of samples after it",
        f"answered after the warm-up: {s['achieved_rps']:.1f} req/s"
        + ("" if s["kept_up"] else f": the server fell behind the {run['rate']:.1f} req/s asked, its queues and "
                                    "connections grew (an overload test, not a soak: try a lower --rate)"),
        "",
        f"{'process':<40} {'pid':>7} {'PSS MB':>8} {'MB/h':>8} {'private':>8} {'MB/h':>8} {'fds':>5} {'fds/h':>7} "
        f"{'restarts':>8}",
    ]
    for name, p in s["processes"].items():
        label = f"{name} ({p['label']})" if p.get("label") else name
        lines.append(f"{label:<40} {p['pids'][-1]:>7} {p['pss_mb']:>8.1f} {fmt(p['pss_mb_per_hour'], '+.1f'):>8} "
                     f"{p['private_mb']:>8.1f} {fmt(p['private_mb_per_hour'], '+.1f'):>8} {p['fds']:>5} "
                     f"{fmt(p['fds_per_hour'], '+.1f'):>7} {p['restarts']:>8}")
    tmp = s["tmp"]
    restarts = s["restarts"]
    lines += [
        f"temp folder: {tmp['files']} files ({fmt(tmp['files_per_hour'], '+.1f')}/h), {tmp['bytes'] / 1e6:.1f} MB "
        f"({fmt(None if tmp['bytes_per_hour'] is None else tmp['bytes_per_hour'] / 1e6, '+.2f')} MB/h)",
        f"restarts: {sum(restarts.values())}" + "".join(f", {name} x{n}" for name, n in restarts.items()),
        "",
        f"requests: {s['requests']['sent']} sent, {s['requests']['good']} good, {s['requests']['bad']} bad"
        + (f"; {s['requests']['unsent']} more were due but still waiting for a free client when the time was up"
           if s["requests"]["unsent"] else ""),
        f"good requests not answered 200: {s['good_errors']} (goal 0)",
    ]
    for model, statuses in s["good_errors_by_model"].items():
        lines.append(f"  {model}: " + ", ".join(f"{status} x{n}" for status, n in statuses.items()))
    for error in s["error_bodies"]:
        lines.append(f"  e.g. {error['model']} {error['input']}: {error['status']} "
                     + " ".join(error["body"].split())[:160])
    lines.append(f"bad requests: {s['bad_answered_4xx']} answered 4xx, {s['bad_answered_other']} otherwise")
    for name, statuses in s["bad_by_case"].items():
        lines.append(f"  {name}: " + ", ".join(f"{status} x{n}" for status, n in statuses.items()))
    latency = s["latency_ms"]
    lines.append(f"latency of good requests after the warm-up: p50 {fmt(latency['p50'])} ms, p99 {fmt(latency['p99'])} "
                 "ms (" + ", ".join(f"{model} {fmt(v['p50'])} / {fmt(v['p99'])}"
                                    for model, v in latency["by_model"].items()) + ")")
    lines += ["", "verdict:"]
    lines += [f"  [{'ok' if goal['met'] else 'FAIL'}] {goal['goal']}: {goal['measured']}" for goal in s["goals"]]
    lines.append("PASS" if s["ok"] else "FAIL")
    return "\n".join(lines)


def plot(run: dict[str, Any], path: Path) -> None:
    """PSS of each process over time; answered req/s and p99 latency over time; the warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, summary = run["samples"], run["summary"]
    figure, (memory_axis, load_axis) = plt.subplots(2, 1, figsize=(12, 9), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 2]})
    memory_axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for name, info in summary["processes"].items():
        points = [(s["t"] / 60, s["processes"][name]["pss_mb"]) for s in samples if name in s["processes"]]
        memory_axis.plot(*zip(*points), label=f"{name} ({info['label']})" if info.get("label") else name)
    for axis in (memory_axis, load_axis):
        axis.axvspan(0, summary["warmup_s"] / 60, color="0.92", zorder=0)
        axis.grid(alpha=0.3)
    memory_axis.set_ylabel("PSS (MB)")
    memory_axis.set_title(f"soak: {run['minutes']:g} min at {run['rate']:.1f} req/s (grey: warm-up): "
                          f"{'PASS' if summary['ok'] else 'FAIL'}")
    memory_axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    minutes = [s["t"] / 60 for s in samples]
    load_axis.plot(minutes, [s["rps"] for s in samples], color="C0", label="answered req/s")
    load_axis.axhline(run["rate"], color="C0", linestyle=":", label="target req/s")
    load_axis.set_ylabel("req/s")
    load_axis.set_xlabel("minutes")
    latency_axis = load_axis.twinx()
    latency_axis.plot(minutes, [s["p99_ms"] for s in samples], color="C3", label="p99 latency, good requests")
    latency_axis.set_ylabel("p99 latency (ms)")
    handles = load_axis.get_legend_handles_labels()[0] + latency_axis.get_legend_handles_labels()[0]
    load_axis.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.08, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the run ---------------------------------------------------------------------------------------------------------


def soak(minutes: float, rate: float | None, interval: float, out: Path, seed: int = 0) -> dict[str, Any]:
    home = Instance.current().home
    good = good_payloads(set(TorchServe(timeout=10).models()))
    if not good:
        raise ServeError(f"none of {', '.join(WEIGHTS)} is registered")
    if left_out := [model for model in WEIGHTS if model not in good]:
        print(f"soak: not registered, left out: {', '.join(left_out)}", file=sys.stderr)
    bad = bad_payloads(set(good))
    target, kind = choose_target()
    token = Token()

    saturation_rps = saturation(target, token, request_mix(good, [], seed + 1))
    print(f"soak: saturation {saturation_rps:.1f} req/s ({SATURATION_CLIENTS} clients, closed loop, "
          f"{SATURATION_SECONDS} s)", file=sys.stderr)
    source = "--rate" if rate else f"{STEADY_SHARE:.0%} of saturation"
    rate = rate or STEADY_SHARE * saturation_rps
    if rate <= 0:
        raise ServeError("no request was answered during the saturation burst: nothing to soak at")
    seconds = minutes * 60
    warmup = min(WARMUP_SHARE * seconds, WARMUP_MAX)
    rule = "20 % of the run" if WARMUP_SHARE * seconds <= WARMUP_MAX else "1 minute, shorter than 20 % of the run"
    print(f"soak: {minutes:g} min at {rate:.1f} req/s to {target}, a sample every {interval:g} s", file=sys.stderr)

    results: list[Result] = []
    start = time.monotonic()
    sampler = Sampler(home, interval, start, seconds, results)
    sampler.start()
    unsent = steady(Sender(target, token, results), request_mix(good, bad, seed), rate, seconds, start)
    sampler.join()

    run = {"minutes": minutes, "rate": round(rate, 2), "rate_source": source,
           "saturation_rps": round(saturation_rps, 2), "target": target, "target_kind": kind,
           "interval_s": interval, "serve_home": str(home), "models": sorted(good),
           "bad_cases": [case.name for case in bad], "worker_labels": sampler.labels, "samples": sampler.samples}
    run["summary"] = summarize(sampler.samples, results, unsent, sampler.labels, rate, seconds, warmup, rule)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(run, indent=1))
    plot(run, out / "soak.png")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_test.soak", description=__doc__.split("\n\n")[1])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the steady load (default 10)")
    parser.add_argument("--rate", type=float, help="requests per second (default: 70%% of the measured saturation)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for soak.json and soak.png")
    args = parser.parse_args(argv)
    try:
        run = soak(args.minutes, args.rate, args.interval, args.out)
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report(run))
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.png'}")
    return 0 if run["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
