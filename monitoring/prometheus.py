"""Run a real Prometheus (the ``prometheus`` binary, Debian's package) that scrapes TorchServe's metrics API.

    python -m monitoring.prometheus start    # make monitor: returns when Prometheus is ready
    python -m monitoring.prometheus stop     # make monitor-stop
    python -m monitoring.prometheus status

It runs with a copy of ``monitoring/prometheus.yml`` whose target is the front door's metrics address in use
(127.0.0.1:8082, or ``PROXY_METRICS_ADDRESS``), keeps its data, log and pid in ``monitoring/data/`` (``MONITOR_DATA``) and listens on
``127.0.0.1:9090`` (``MONITOR_ADDRESS``). A Prometheus installed as a system service is not used nor touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
import yaml

from serving.instance import Instance

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "prometheus.yml"
DEFAULT_DATA = HERE / "data"
DEFAULT_ADDRESS = "127.0.0.1:9090"
JOB = "torchserve"


class MonitorError(RuntimeError):
    """Something a user can act on, in one line."""


def render_config(metrics_url: str, scrape_interval: str | None = None) -> str:
    """The shipped prometheus.yml with its targets set to ``metrics_url`` (and its scrape interval, if given)."""
    config = yaml.safe_load(CONFIG.read_text())
    if scrape_interval:
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [urlsplit(metrics_url).netloc]}]
    return yaml.safe_dump(config, sort_keys=False)


def binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise MonitorError("prometheus is not installed: run ./install.sh")
    return found


class Prometheus:
    """One Prometheus process with its config, data, log and pid file in ``data``, answering at ``listen``."""

    def __init__(self, data: Path, listen: str):
        self.data, self.listen = Path(data), listen
        self.url = f"http://{listen}"
        self.pid_file = self.data / "prometheus.pid"
        self.log = self.data / "prometheus.log"

    def pid(self) -> int | None:
        """The pid of our running Prometheus, or None."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def start(self, metrics_url: str, scrape_interval: str | None = None, timeout: float = 30.0) -> None:
        if self.pid():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.data / "prometheus.yml"
        config.write_text(render_config(metrics_url, scrape_interval))
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                [binary(), f"--config.file={config}", f"--storage.tsdb.path={self.data / 'tsdb'}",
                 f"--web.listen-address={self.listen}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-5:])
                raise MonitorError(f"prometheus exited (status {process.returncode}); {self.log}:\n{tail}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise MonitorError(f"prometheus not ready at {self.url} after {timeout:g} s: see {self.log}")

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop our Prometheus (SIGTERM, it flushes its data); False if it was not running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                pass
            if self.pid() is None:
                self.pid_file.unlink(missing_ok=True)
                return True
            time.sleep(0.1)
        raise MonitorError(f"prometheus (pid {pid}) did not stop within {timeout:g} s")

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """An instant query through the HTTP API: the result vector, [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        response = requests.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise MonitorError(f"query {promql!r} failed: {body.get('error', response.text[:200])}")
        return body["data"]["result"]


def from_environment() -> Prometheus:
    return Prometheus(Path(os.environ.get("MONITOR_DATA", DEFAULT_DATA)), os.environ.get("MONITOR_ADDRESS",
                                                                                          DEFAULT_ADDRESS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.prometheus", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    prometheus = from_environment()
    try:
        if args.command == "start":
            running = prometheus.pid()
            metrics = Instance.current().front_metrics
            prometheus.start(metrics)
            print(f"Prometheus {'is already running' if running else 'ready'} at {prometheus.url}, scraping "
                  f"{metrics}/metrics; data in {prometheus.data}")
            print(f"  try: {prometheus.url}/graph?g0.expr=sum+by+(model_version)+(rate(handler_request_seconds_count[1m]))")
        elif args.command == "stop":
            print("Prometheus stopped" if prometheus.stop() else "Prometheus is not running")
        else:
            pid = prometheus.pid()
            print(f"Prometheus is running at {prometheus.url} (pid {pid})" if pid else "Prometheus is not running")
            return 0 if pid else 3
    except MonitorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
