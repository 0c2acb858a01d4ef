"""The footprint harness (``load_test/footprint.py``): a ``--quick`` run against its own TorchServe writes a
well-formed report: every target with its measured figure, every version READY, a PSS for every worker, the plots."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import yaml
from PIL import Image

from archives.store import Manifest, sha256_file
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_a_quick_footprint_run_reports_every_target_version_and_worker(tmp_path):
    run = subprocess.run([sys.executable, "-m", "load_test.footprint", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=400, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "footprint.json").read_text())

    targets = [row for row in results["targets"] if row["goal"] is not None]
    assert len(targets) == 4, results["targets"]
    assert all(isinstance(row["value"], float) and row["value"] > 0 and row["met"] in (True, False) for row in targets)
    assert all(row["target"][:40] in run.stdout for row in targets)  # the targets table is printed

    built = {(entry["model"], entry["version"]) for entry in Manifest().entries()}
    start = results["start"]
    assert {(v["model"], v["version"]) for v in start["versions"].values()} == built
    for key, version in start["versions"].items():
        assert version["ready"] is not None and 0 < version["ready"] <= start["serve_sh_seconds"], key
        assert version["registration"] and version["workers"], key
        for worker in version["workers"]:  # the breakdown of each worker's start, in order
            moments = [worker[k] for k in ("spawned", "python_up", "load_command", "handler_ready")]
            assert None not in moments and moments == sorted(moments), (key, worker)
    assert 0 < start["events"]["java_spawned"] < start["events"]["apis_bound"] <= start["all_ready_s"]

    workers = [w for v in start["versions"].values() for w in v["workers"]]
    processes = {p["pid"]: p for p in results["memory"]["processes"]}
    assert len(workers) == start["workers"] and all(processes[w["pid"]]["pss_mb"] > 1 for w in workers)
    assert {p["kind"] for p in processes.values()} == {"frontend", "worker", "nginx", "health", "gateway"}
    assert all(p["runtime"] in ("torchscript", "onnxruntime") for p in processes.values() if p["kind"] == "worker")
    assert results["memory"]["total_pss_mb"] == pytest.approx(sum(p["pss_mb"] for p in processes.values()))

    assert {"efficientnet_lite0 1.1", "efficientnet_lite0 1.0"} <= set(results["register"])
    assert all(len(r["seconds"]) == 1 and r["median"] > 0 for r in results["register"].values())
    assert "cpu" not in results  # --quick: no CPU experiments

    report = (tmp_path / "footprint.md").read_text()
    table = report.split("## Targets")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(results["targets"])
    assert all(any(ch.isdigit() for ch in row.split("|")[2]) and row.split("|")[4].strip() in ("yes", "**no**")
               for row in rows[:4])
    for plot in ("footprint_timeline.png", "footprint_pss.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.format == "PNG" and image.width > 500


def test_a_tools_store_and_its_reconfigured_copies_leave_the_built_archives_as_they_are(tmp_path):
    """``load_test.measure``: a tool's own store links model_store/'s files, so a copy reconfigured in it (an
    unpacked folder, an archive in place) must be a new file, never one written through a link."""
    from load_test.measure import model_store, reconfigured

    source = Manifest()
    store = model_store(tmp_path / "store", lambda entry: entry["model"] == "digits", unpacked=True)
    own = Manifest(store)
    assert own.entries() == [entry for entry in source.entries() if entry["model"] == "digits"]
    entry = own.get("digits", "2.0")
    folder = reconfigured(own.unpacked("digits", "2.0"), store / "copy", batchSize=3)
    archive = reconfigured(store / entry["archive"], store / entry["archive"], batchSize=3)
    with zipfile.ZipFile(archive) as mar:
        copies = [yaml.safe_load(text) for text in (mar.read("model-config.yaml"),
                                                     (folder / "model-config.yaml").read_text())]
    built = yaml.safe_load((source.unpacked("digits", "2.0") / "model-config.yaml").read_text())
    assert copies == [{**built, "batchSize": 3}] * 2 and built["batchSize"] != 3
    assert sha256_file(source.store / entry["archive"]) == entry["sha256"]
