"""The load-test harness itself: Locust scenarios against the tests' TorchServe and proxy, and a short `make bench`
run whose servers, the peers (LitServe, BentoML, Ray Serve) included, must start, answer the real photos correctly,
and produce a well-formed report with plots."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from handlers.runtime import OnnxModel
from load_test.bench_report import MODEL
from tests.conftest import REPO, manage, ok

pytestmark = pytest.mark.integration


def test_locust_scenarios_run_headless_and_count_every_request(served, restored, tmp_path):
    ok(manage("ab", "digits", "1.0=50", "2.0=50"))
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "load_test/locustfile.py", "--headless", "--users", "9",
         "--spawn-rate", "9", "--run-time", "6s", "--csv", str(tmp_path / "load"), "--only-summary",
         "ClassifierUser", "DigitsUser", "ABUser", "ModelUser"], cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, "ARG_MODEL": "super_resolution"})  # ModelUser: PNG answers
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "load_stats.csv") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert int(rows["efficientnet_lite0"]["Request Count"]) > 0 and int(rows["digits"]["Request Count"]) > 0
    assert int(rows["super_resolution"]["Request Count"]) > 0
    via_proxy = {name.rsplit(" ", 1)[1] for name in rows if name.startswith("digits via proxy ->")}
    assert via_proxy and via_proxy <= {"1.0", "2.0"}, rows.keys()
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), rows


@pytest.mark.timeout(900)  # the peers' start-ups (Ray's ~20 s) on a shared 2-core machine
def test_a_short_bench_run_writes_a_well_formed_table_and_plots(tmp_path):
    run = subprocess.run([sys.executable, "-m", "load_test.bench", "--quick", "--seconds", "1", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=880, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    servers = list(dict.fromkeys(p["server"] for p in results["servers"]))
    assert len(servers) == 5 and servers[0].startswith("ours, ONNX Runtime") and servers[1].startswith("ours, TorchScript")
    assert all(p["failed"] == 0 and p["p50_ms"] <= p["p99_ms"] for p in results["servers"])
    # in one second the stock handler under TorchServe's defaults may answer nothing (oversubscribed threads)
    assert all(p["rps"] > 0 for p in results["servers"] if p["server"] in (servers[0], servers[-1]))
    assert all(0 <= p["client_cores"] < p["machine_cores"] for p in results["servers"])
    for runtime in ("torchscript", "onnxruntime"):
        assert results["limit"][runtime]["threads"]["1"] > 0 and results["limit"][runtime]["processes"]["1"] > 0
        footprint = results["footprint"][runtime]
        assert footprint["worker_rss_mib"] > 100 and footprint["worker_load_ms"] > 0 and footprint["archive_mb"] > 1
    assert len(results["forward"]) == 3 and all(rate > 0 for rates in results["forward"].values() for rate in rates)
    assert len(results["paired"]) == 1 and results["paired"][0]["served"] > 0

    report = (tmp_path / "bench.md").read_text()
    targets = report.split("## Targets")[1].split("##")[0]
    assert len([line for line in targets.splitlines() if line.startswith("| ") and "---" not in line]) == 9
    served_rows = [line for line in report.split("## Served")[1].split("##")[0].splitlines() if line.startswith("| ")]
    assert len(served_rows) == 2 + len(results["servers"])
    for plot in ("throughput.png", "latency.png", "peers.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.format == "PNG" and image.width > 500

    # the peers: each started, answered every photo as our handler does (the bench checks that before measuring),
    # and has a full row beside ours and the two baselines
    peers = results["peers"]
    rows = {row["server"].split(" (")[0]: row for row in peers["rows"]}
    assert list(rows) == ["ours", "LitServe", "BentoML", "Ray Serve", "stock handler, TorchServe defaults",
                          "Flask app"], list(rows)
    assert [row["kind"] for row in peers["rows"]] == ["ours", "peer", "peer", "peer", "baseline", "baseline"]
    for name in ("ours", "LitServe", "BentoML", "Ray Serve"):  # --quick measures concurrency 1 and 16
        row = rows[name]
        assert row["failed"] == 0 and row["rps_c16"] > 0 and row["rps_c64"] is None, row
        assert 0 < row["p50_c1_ms"] <= row["p99_c1_ms"] and 0 < row["p50_c16_ms"] <= row["p99_c16_ms"], row
    for name, row in rows.items():
        assert row["start_seconds"] > 0 and row["memory_mb"] > 50 and row["processes"], (name, row)
    assert len(rows["Ray Serve"]["processes"]) > len(rows["LitServe"]["processes"])  # raylet, GCS, dashboard, ...
    goals = [goal["goal"] for goal in peers["goals"]]
    assert goals == ["ours at least 1.2 x the best peer on req/s at c16", "ours no worse than the best peer on p50 at c1",
                     "ours no worse than the best peer on memory",
                     "ours no worse than the best peer on start to first answer"], goals
    assert all(line.split(" wins ")[0] in ("LitServe", "BentoML", "Ray Serve") for line in peers["wins"])
    section = report.split("## Peers")[1]
    table = [line for line in section.split("\n\n")[2].splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(rows) and all(line.count("|") == 9 for line in table), table
    assert all(f"| {row['server']} |" in section for row in peers["rows"])
    assert ("Where a peer beats ours" in section) == bool(peers["wins"]) and "![peers](peers.png)" in section

    # the INT8 file, made by make quantize into a store of its own: ours and each peer serve it
    int8 = peers["int8"]
    assert int8["from_version"] == results["versions"][results["default_runtime"]] != int8["version"]
    assert int8["gate"]["agreement"] >= int8["gate"]["min_allowed"]
    assert [row["server"].split(" (")[0] for row in int8["rows"]] == ["ours", "LitServe", "BentoML", "Ray Serve"]
    assert all(row["failed"] == 0 and row["rps_c16"] > 0 for row in int8["rows"]), int8["rows"]
    assert f"({MODEL} {int8['version']})" in int8["rows"][0]["server"] and len(int8["goals"]) == len(goals)
    int8_section = report.split("## The INT8 file, ours and the peers")[1]
    assert all(f"| {row['server']} |" in int8_section for row in int8["rows"])


def test_the_runtime_comparison_prints_both_runtimes_for_a_model():
    run = subprocess.run([sys.executable, "-m", "load_test.runtimes", "--model", "digits", "--rounds", "1",
                          "--seconds", "0.2"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    row, openvino, levels = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
                             if line.startswith("| digits |")]  # both runtimes, OpenVINO, ONNX Runtime's levels
    assert row[1] == "16" and all(float(cell.split()[0]) > 0 for cell in row[2:])
    assert all(float(cell.split()[0]) > 0 for cell in openvino[1:5]) and float(openvino[5]) < 1e-4, openvino
    rates = dict(zip(OnnxModel.OPTIMIZATIONS, map(float, levels[1:-2])))
    assert min(rates.values()) > 0 and levels[-2] == max(rates, key=rates.get), levels
    assert float(levels[-1]) == pytest.approx(rates["all"] / max(rates.values()), abs=0.02), levels
