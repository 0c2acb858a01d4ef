"""``python -m load_test.soak [--minutes M] [--rate R] [--interval S] [--out DIR]``: a soak test of the running server.

One question: does the server stay healthy under a steady, realistic load for a long time? No errors, and no process
that keeps growing (memory, open files) or leaves files behind in its temp folder. It runs against the instance the
environment describes (``Instance.current()``: ``SERVE_HOME``, ``PROXY_ADDRESS``, ``TS_*``, as ``python -m manage``
reads them).

1. **Saturation**: a closed-loop burst (16 clients, 12 s counted after 2 s) of the good requests (a bad one may kill a
   worker, which would make the capacity look lower than it is). The steady load is 70 % of it unless ``--rate``.
2. **Steady load**, open loop: request i is due at i / rate, handed to a pool of client threads, so a slow server
   shows as latency (counted from when the request was due), never as a lower rate. Through the front door (straight
   to TorchServe when nothing answers there, said on stderr and in soak.json). The mix: photos to
   ``efficientnet_lite0`` (raw and multipart), digits, sentences to ``minilm``, small photos to ``super_resolution``;
   one request in 100 a bad one in turn (not an image, a 1x60000 PNG, empty, broken JSON, truncated, over the pixel
   limit). A good request must be answered 200, a bad one 4xx.
3. **Samples** every ``--interval`` seconds: PSS, private memory and open descriptors of the frontend, each worker (by
   TorchServe's worker id: a restart shows as a new pid under the same name), the health checker, the v2 gateway and
   nginx; the size and file count of ``$SERVE_HOME/tmp``; the interval's req/s and latency. A line each on stderr.
4. **Summary** (``soak_report.py``): after a warm-up (20 % of the run, at most a minute), growth per hour of every
   series (least squares, on a restarted worker's last process), restarts, errors by model and status, bad requests
   by case, latency; the verdict: kept up with the rate, zero errors, every bad request 4xx, PSS growth under 50 MB/h
   per process, no growth of the descriptors' or the temp folder's floor (the lowest of the last third against the
   lowest of the first: connections in flight come and go above it, a leak raises it). Exit status 0 when every goal
   is met.

Reading it: PSS moves a little when unrelated processes map the same libraries; the private column does not. A short
run extrapolates to an hour (a JVM heap growing to its working size, ONNX Runtime's arena growing in steps), so trust
the memory verdict from runs of 30 minutes and more, and look in soak.png for a line that keeps climbing. A server
that falls behind the rate (answers under 95 % of it) builds queues: an overload test, not a soak; give a lower
``--rate``. Output in ``--out`` (default ``load_test/results/``): ``soak.json`` (settings, samples, summary) and
``soak.png``.
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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import requests

from load_test.measure import RESULTS, fmt, memory
from load_test.soak_report import ms, percentile, plot, report, summarize
from serving.instance import Instance, ServeError
from serving.torchserve import TorchServe

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

    def __init__(self, instance: Instance) -> None:
        self.client = TorchServe(instance)
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

    def session(self) -> requests.Session:
        session = requests.Session()
        certificate = self.token.client.instance.settings.get("TLS_CERT")
        if self.base_url.startswith("https") and certificate:
            session.verify = certificate  # the front door's own certificate
        return session

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


def choose_target(token: Token) -> tuple[str, str]:
    """(base URL, what it is): the front door, or TorchServe's inference API when nothing listens there."""
    instance = token.client.instance
    try:
        Sender(instance.front, token, []).session().get(f"{instance.front}/ping", timeout=5)
        return instance.front, "front door"
    except requests.ConnectionError:
        inference = instance.torchserve("inference")
        print(f"soak: nothing answers at the front door {instance.front}: sending straight to TorchServe at "
              f"{inference}", file=sys.stderr)
        return inference, "TorchServe's inference API: the front door did not answer"


def saturation(base_url: str, token: Token, mix: Iterator[Payload]) -> float:
    """Requests per second that SATURATION_CLIENTS closed-loop clients get answered."""
    results: list[Result] = []
    sender = Sender(base_url, token, results)
    lock = threading.Lock()
    start = time.monotonic()
    end = start + SATURATION_WARMUP + SATURATION_SECONDS

    def client() -> None:
        with sender.session() as session:
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
        with sender.session() as session:
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


def worker_id(process: psutil.Process, frontend: int) -> str | None:
    """TorchServe's id of one of its frontend's workers: the port in its ``--sock-name .../.ts.sock.9000`` (a process
    a worker forks has that command line too, not that parent)."""
    with contextlib.suppress(psutil.Error):
        args = process.cmdline()
        if "--sock-name" in args and process.ppid() == frontend:
            return args[args.index("--sock-name") + 1].rpartition(".")[2]
    return None


def watched(instance: Instance) -> dict[str, int]:
    """name → pid of each process watched: the Java frontend and its workers, the health checker and the v2 gateway
    (serve.sh's ``manage health`` and ``manage v2``), nginx's master and workers."""
    found, trees = {}, instance.processes()
    if frontend := trees.get("frontend"):
        found[FRONTEND] = java = frontend[0].pid
        workers = sorted((wid, p.pid) for p in frontend[1:] if (wid := worker_id(p, java)))
        found.update((f"worker {wid}", pid) for wid, pid in workers)
    found.update((name, trees[name][0].pid) for name in ("health checker", "v2 gateway") if name in trees)
    if nginx := trees.get("nginx master"):
        found["nginx master"] = nginx[0].pid
        found.update((f"nginx worker {number}", pid) for number, pid in enumerate(sorted(p.pid for p in nginx[1:]), 1))
    return found


def sample_process(pid: int) -> dict[str, Any] | None:
    """PSS and private memory (MB) and open descriptors of a process; None when it is gone or a zombie."""
    try:
        fds = psutil.Process(pid).num_fds()
    except psutil.Error:
        return None
    if (found := memory(pid)) is None:
        return None
    return {"pid": pid, "pss_mb": round(found.pss / 1e6, 2), "private_mb": round(found.private / 1e6, 2), "fds": fds}


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


def worker_labels(client: TorchServe) -> dict[str, str]:
    """TorchServe's worker id → "model version", from its management API (empty if that does not answer)."""
    try:
        registered = client.registered()
    except (ServeError, requests.RequestException):
        return {}
    return {str(worker["id"]): f"{model} {version}" for (model, version), info in registered.items()
            for worker in info.get("workers", [])}


class Sampler(threading.Thread):
    """Every ``interval`` seconds while the load runs: the watched processes, the temp folder, the interval's
    answers."""

    def __init__(self, client: TorchServe, interval: float, start: float, seconds: float, results: list[Result]):
        super().__init__(daemon=True)
        self.client, self.interval, self.start_time, self.seconds = client, interval, start, seconds
        self.results = results
        self.samples: list[dict[str, Any]] = []
        self.labels = worker_labels(client)
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
        processes = {name: found for name, pid in watched(self.client.instance).items()
                     if (found := sample_process(pid))}
        if any(name.startswith("worker ") and name[7:] not in self.labels for name in processes):
            self.labels.update(worker_labels(self.client))
        tmp_bytes, tmp_files = folder_size(self.client.instance.home / "tmp")
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


# --- the run ---------------------------------------------------------------------------------------------------------


def soak(instance: Instance, minutes: float, rate: float | None, interval: float, out: Path,
         seed: int = 0) -> dict[str, Any]:
    client = TorchServe(instance, timeout=10)
    good = good_payloads(set(client.models()))
    if not good:
        raise ServeError(f"none of {', '.join(WEIGHTS)} is registered")
    if left_out := [model for model in WEIGHTS if model not in good]:
        print(f"soak: not registered, left out: {', '.join(left_out)}", file=sys.stderr)
    bad = bad_payloads(set(good))
    token = Token(instance)
    target, kind = choose_target(token)

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
    sampler = Sampler(client, interval, start, seconds, results)
    sampler.start()
    unsent = steady(Sender(target, token, results), request_mix(good, bad, seed), rate, seconds, start)
    sampler.join()

    run = {"minutes": minutes, "rate": round(rate, 2), "rate_source": source,
           "saturation_rps": round(saturation_rps, 2), "target": target, "target_kind": kind,
           "interval_s": interval, "serve_home": str(instance.home), "models": sorted(good),
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
        run = soak(Instance.current(), args.minutes, args.rate, args.interval, args.out)
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report(run))
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.png'}")
    return 0 if run["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
