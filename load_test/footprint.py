"""``python -m load_test.footprint``: start-up, memory and the frontend's CPU of the demo, measured and printed against
their targets.

One module a part: 1. the start-up, timed and broken down (``footprint_start``); 2. memory after real requests to
every version (``footprint_memory``); 3. register → READY (``footprint_register``); 4. the frontend's CPU under load,
the TorchServe settings that might cut it and the access log's cost (``footprint_cpu``). ``--quick`` skips part 4 and
repeats part 3 once (the harness test). Output in ``load_test/results/`` (or ``--out``), by ``footprint_report``:
``footprint.md``, ``footprint.json``, ``footprint_timeline.png``, ``footprint_pss.png`` and, with part 4,
``footprint_cpu.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archives.store import Manifest
from load_test import footprint_cpu as cpu
from load_test.footprint_memory import memory, warm_up
from load_test.footprint_register import probes, registration
from load_test.footprint_report import markdown, plots, targets, targets_table
from load_test.footprint_start import start_timeline, started
from load_test.measure import RESULTS, fmt, machine, model_store
from serving.instance import Instance


def say(message: str) -> None:
    print(message, flush=True)


def run(out: Path = RESULTS, quick: bool = False, seconds: float = 10.0, rounds: int = 3, repeats: int = 3,
        log: Callable[[str], None] = say, settings: list[str] | None = None) -> dict[str, Any]:
    """Parts 1-4 (``quick``: without 4, part 3 once); the results as a dict (``markdown()`` renders it).
    ``settings``: the names of the variants() to try (default all; "shipped" is always tried)."""
    began = time.monotonic()

    def step(message: str) -> None:
        log(f"[{time.monotonic() - began:6.1f} s] {message}")

    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest()
    if not manifest.entries():
        raise SystemExit(f"no archives in {manifest.store}: build them first with make archive")
    repeats = 1 if quick else repeats
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "seconds_per_run": seconds, "rounds": rounds,
                               "repeats": repeats, "concurrency": cpu.CONCURRENCY}
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp_name:
        tmp = Path(tmp_name)
        store = model_store(tmp / "store", source=manifest, unpacked=True)
        own, registered = Manifest(store), probes(store)
        files = None if quick else cpu.cpu_files(tmp / "inputs")
        step(f"1. serve.sh start: {len(own.entries())} versions from {manifest.store}")
        with started(Instance.fresh(tmp / "demo", store=store)) as demo:
            timeline = start_timeline(demo, own)
            results["start"] = timeline
            step(f"   every version READY {fmt(timeline['all_ready_s'], 1)} s after the spawn of serve.sh (it returned "
                 f"after {timeline['serve_sh_seconds']:.1f} s, {timeline['workers']} workers)")
            step("2. warm-up: real requests to every version, then PSS of every process")
            results["warmup"] = warm_up(demo, own)
            for key, answers in results["warmup"].items():
                if answers["first_failure"]:
                    step(f"   warm-up of {key}: {answers['requests'] - answers['ok']} of {answers['requests']} "
                         f"requests failed, first: {answers['first_failure'][:160]}")
            time.sleep(1.0)
            results["memory"] = memory(demo, own)
            step(f"   total PSS {results['memory']['total_pss_mb']:.0f} MB")
            if not quick:
                step(f"4a. the frontend's CPU, concurrency {cpu.CONCURRENCY}, {seconds:g} s per run")
                results["cpu"] = {"baseline": cpu.frontend_cpu(demo, files, seconds, log)}
            step("3. register → READY, one worker")
            results["register"] = {}
            for key, (model, version, probe, form) in registered.items():
                results["register"][key] = registration(demo, model, version, probe, repeats, log,
                                                        2.0 if quick else 10.0)
                results["register"][key]["form"] = form
            results["collector"] = cpu.collector_cost(demo)
        if not quick:
            step(f"4b. frontend settings, each on a fresh TorchServe (digits 2.0), {rounds} rounds in turns")
            chosen = [v for v in cpu.variants() if v[0] == "shipped" or settings is None or v[0] in settings]
            results["cpu"]["settings"] = cpu.settings_experiment(tmp, manifest, files, seconds, rounds, log, chosen)
            step(f"4c. TorchServe's access log without and with predictions, in turns within one TorchServe, "
                 f"{cpu.ACCESS_TURNS} turns")
            results["cpu"]["access_log"] = cpu.access_log_switched(tmp, manifest, files["digits"], seconds,
                                                               cpu.ACCESS_TURNS, log)
    results["targets"] = targets(results)
    results["duration_s"] = time.monotonic() - began
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no CPU experiments, one registration each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per loaded run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the settings experiment")
    parser.add_argument("--repeats", type=int, default=3, help="registrations timed per version")
    parser.add_argument("--settings", help="comma-separated names of the frontend settings to try (default: all): "
                        + ", ".join(name for name, *_ in cpu.variants()))
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.settings.split(",")] if args.settings else None
    unknown = set(chosen or ()) - {name for name, *_ in cpu.variants()}
    if unknown:
        parser.error(f"unknown settings: {', '.join(sorted(unknown))}")
    results = run(args.out, args.quick, args.seconds, args.rounds, args.repeats, settings=chosen)
    (args.out / "footprint.json").write_text(json.dumps(results, indent=2))
    plots(results, args.out)
    (args.out / "footprint.md").write_text(markdown(results))
    print()
    print(targets_table(results))
    print(f"\nwritten: {args.out / 'footprint.md'}, footprint.json and the plots (in {results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
