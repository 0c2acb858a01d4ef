"""The footprint's report: its targets judged, ``footprint.md`` and the plots, from the results
``footprint.run`` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from load_test.footprint_cpu import CONCURRENCY
from load_test.footprint_start import POLL_SECONDS
from load_test.measure import fmt, plotted
from serving.instance import Instance

# Targets on this project's 2-core machine.
START_TARGET_S = 10.0
REGISTER_TARGET_S = 1.5
ONNX_WORKER_TARGET_MB = 150.0
TOTAL_TARGET_MB = 1500.0


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with its measured figure; then the figures reported without a target (goal None)."""
    start, mem = results["start"], results["memory"]
    register = results.get("register", {}).get("efficientnet_lite0 1.1")
    largest = mem["largest_onnx_worker"]
    rows = [
        {"target": f"serve.sh start → every version READY ({len(start['versions'])} versions, {start['workers']} "
                   f"workers; management API polled every {POLL_SECONDS:g} s)",
         "value": start["all_ready_s"], "unit": "s", "goal": START_TARGET_S},
        {"target": "register → READY, efficientnet_lite0 1.1 (ONNX Runtime), 1 worker, median of "
                   f"{len(register['seconds']) if register else 0}",
         "value": register and register["median"], "unit": "s", "goal": REGISTER_TARGET_S},
        {"target": "ONNX Runtime worker PSS after warm-up, the largest"
                   + (f" ({largest['name']})" if largest else ""),
         "value": largest and largest["pss_mb"], "unit": "MB", "goal": ONNX_WORKER_TARGET_MB},
        {"target": "the whole demo's PSS (frontend + every worker + nginx + health checker + v2 gateway)",
         "value": mem["total_pss_mb"], "unit": "MB", "goal": TOTAL_TARGET_MB},
        {"target": "serve.sh start returns (front door ready)", "value": start["serve_sh_seconds"], "unit": "s",
         "goal": None},
    ]
    digits = next((r for r in (results.get("cpu") or {}).get("baseline", [])
                   if r["model"] == "digits" and r["path"] == "front door"), None)
    rows.append({"target": f"frontend CPU per request, digits through the front door, concurrency {CONCURRENCY}",
                 "value": digits and digits["java_ms_per_request"], "unit": "ms", "goal": None})
    rows.append({"target": "frontend's share of the machine's CPU under that load",
                 "value": digits and digits["java_share"] * 100, "unit": "%", "goal": None})
    for row in rows:
        row["met"] = None if row["goal"] is None or row["value"] is None else row["value"] <= row["goal"]
    return rows


def markdown(results: dict[str, Any]) -> str:
    m, start, mem = results["machine"], results["start"], results["memory"]
    lines = [
        f"# Footprint: start-up, memory and the frontend's CPU, on {m['cores']} cores",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Linux {m['kernel']}; Python {m['python']}, "
        f"torch {m['torch']}, ONNX Runtime {m.get('onnxruntime', '-')}, TorchServe {m['torchserve']}; {m['date']}"
        + ("; quick run (no CPU experiments, one registration each)" if results["quick"] else "") + ".",
        "The machine may be shared with other work: timings vary from run to run, compare within one run.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "| --- | ---: | --- | --- |",
    ]
    for row in results["targets"]:
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['target']} | {measured(row)} | {goal(row)} | {met} |")

    e = start["events"]
    lines += [
        "",
        "## Start-up timeline (seconds after serve.sh was spawned)",
        "",
        "| event | s |",
        "| --- | ---: |",
        *(f"| {label} | {fmt(e[key], 2)} |" for key, label in (
            ("java_spawned", "JVM spawned (TorchServe's launcher, after serve.sh checked every archive)"),
            ("first_log_line", "frontend's first log line"),
            ("first_registration", "first archive registration begins"),
            ("apis_bound", "APIs bound (after every archive is registered)"),
            ("api_first_answer", "management API first answered the poller"),
            ("ping_first_answer", "/ping first answered"),
            ("ping_healthy", "/ping first answered 200"),
            ("health_checker_spawned", "health checker spawned"),
            ("nginx_spawned", "front door (nginx) spawned"),
            ("serve_sh_returned", "serve.sh returned"))),
        f"| every version READY (API poll) | {fmt(start['all_ready_s'], 2)} |",
        f"| every handler's \"ready on\" line | {fmt(start['all_handlers_ready_s'], 2)} |",
        "",
        ("Per version: the registration (on the frontend's main thread, one version after the other: an archive is "
        "extracted, an unpacked folder linked); per worker: process spawned (/proc), Python up (its first log line: "
        "socket listening), load "
        "command received, the handler's \"ready on\" line (handler imports, model load and warm-up), READY first "
        "seen by the poller. The management API only answers once every archive is registered, so a worker READY "
        "before that is seen READY then."),
        "",
        ("| version | runtime | archive MB | served from | registration | worker | spawned | Python up | load cmd | "
        "handler ready | READY (API) | torch? |"),
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    torch_of = {p["pid"]: p.get("torch") for p in mem["processes"]}
    for key, version in start["versions"].items():
        registration = version["registration"]
        reg = f"{registration[0]:.2f} → {registration[1]:.2f}" if registration else "-"
        for worker in version["workers"]:
            torch = torch_of.get(worker["pid"])
            lines.append(
                f"| {key} | {version['runtime'] or '-'} | {fmt(version['archive_mb'], 1)} | "
                f"{version.get('served_from', '-')} | {reg} | W-{worker['id']} | "
                f"{fmt(worker['spawned'], 2)} | {fmt(worker['python_up'], 2)} | {fmt(worker['load_command'], 2)} | "
                f"{fmt(worker['handler_ready'], 2)} | {fmt(worker['ready_polled'], 2)} | "
                f"{'-' if torch is None else ('yes' if torch else 'no')} |")
    lines += ["", "![start-up timeline](footprint_timeline.png)", ""]

    lines += [
        "## Memory after warm-up (PSS: each shared page divided among the processes that map it; MB = 10^6 bytes)",
        "",
        "Warm-up: " + ", ".join(f"{key} {w['ok']}/{w['requests']}" for key, w in results["warmup"].items())
        + " real requests answered 200, through the front door."
        + "".join(f" **{key}: {w['requests'] - w['ok']} failed**, first: `{w['first_failure'][:120]}`."
                  for key, w in results["warmup"].items() if w["first_failure"]),
        "",
        "| process | pid | runtime | torch loaded | ONNX Runtime loaded | PSS MB | RSS MB |",
        "| --- | ---: | --- | --- | --- | ---: | ---: |",
        *(f"| {p['name']} | {p['pid']} | {p.get('runtime') or '-'} | {'yes' if p['torch'] else 'no'} | "
          f"{'yes' if p['onnxruntime'] else 'no'} | {p['pss_mb']:.1f} | {p['rss_mb']:.1f} |" for p in mem["processes"]),
        f"| **total** | | | | | **{mem['total_pss_mb']:.1f}** | {mem['total_rss_mb']:.1f} |",
        "",
        "By kind: " + ", ".join(f"{kind} {value:.0f} MB" for kind, value in mem["by_kind_pss_mb"].items()) + ".",
        "",
        "![PSS per process](footprint_pss.png)",
        "",
        "## Register → READY (one version into the running demo, 1 worker)",
        "",
        ("Each time: the version unregistered (another version made the default first), then a synchronous "
        "registration of a copy of it (hard links) whose model-config asks for one worker, until the worker is "
        "READY (polled every 20 ms): its unpacked folder, as `manage register` does, and for comparison its .mar. "
        "Breakdown of the median run, seconds after the request: registration done (archive extracted or folder "
        "linked), worker spawned, Python up, load command, handler ready, READY."),
        "",
        ("| version | runtime | registered from | median s | all runs s | registered | spawned | Python up | load cmd "
        "| handler ready | torch in worker |"),
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    runtimes = {key: v["runtime"] for key, v in start["versions"].items()}
    for key, reg in results.get("register", {}).items():
        run_ = reg["median_run"]
        version_key = f"{reg['model']} {reg['version']}"
        lines.append(f"| {version_key} | {runtimes.get(version_key) or '-'} | {reg.get('form', '-')} | "
                     f"{reg['median']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in reg['seconds'])} | {fmt(run_['extracted'], 2)} | "
                     f"{fmt(run_['spawned'], 2)} | {fmt(run_['python_up'], 2)} | {fmt(run_['load_command'], 2)} | "
                     f"{fmt(run_['handler_ready'], 2)} | {'yes' if run_['torch_in_worker'] else 'no'} |")
    collector = results.get("collector")
    if collector:
        lines += ["", (f"The system metrics collector (a Python process TorchServe forks every metric_time_interval, "
                      f"60 s by default): {collector['cpu_seconds_per_run'] * 1e3:.0f} ms of CPU per run (median of "
                      f"{len(collector['runs'])}), {collector['cpu_seconds_per_run'] / 60:.2%} of one core at one run "
                      "a minute.")]
    cpu = results.get("cpu")
    if cpu:
        lines += cpu_markdown(cpu, results)
    return "\n".join(lines) + "\n"


def cpu_markdown(cpu: dict[str, Any], results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        (f"## The frontend's CPU under load (wrk, 1 thread, {results['concurrency']} connections, "
        f"{results['seconds_per_run']:g} s per run, after the JIT's warm-up)"),
        "",
        ("Frontend = TorchServe's Java process (utime + stime from /proc, every thread); without JIT = its JIT "
        "compiler threads left out (still compiling after the warm-up: a fresh JVM's cost, not the requests'); "
        "net of rest = minus what it uses at rest (the health checker polls its management API twice a second). "
        "Share = its CPU over all the CPU the machine used. Cores: CPU seconds per second."),
        "",
        ("| model | path | req/s | p50 ms | p99 ms | frontend ms/request | without JIT | net of rest | frontend cores "
        "| share | machine cores | workers | nginx | wrk |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in cpu["baseline"]:
        c = r["cores"]
        lines.append(f"| {r['model']} | {r['path']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['java_ms_per_request']:.3f} | {r['java_ms_per_request_steady']:.3f} | "
                     f"{r['java_ms_per_request_net']:.3f} | {r['java_cores']:.2f} | "
                     f"{r['java_share']:.0%} | {r['machine_cores']:.2f} | {c['workers']:.2f} | {c['nginx']:.2f} | "
                     f"{c['wrk']:.2f} |")
    groups = list(dict.fromkeys(g for r in cpu["baseline"] for g in r["threads_ms_per_request"]))
    lines += ["", "The frontend's CPU per request by thread (ms):", "",
              "| model | path | " + " | ".join(groups) + " |", "| --- | --- |" + " ---: |" * len(groups)]
    for r in cpu["baseline"]:
        lines.append(f"| {r['model']} | {r['path']} | "
                     + " | ".join(f"{r['threads_ms_per_request'].get(g, 0.0):.3f}" for g in groups) + " |")
    settings = cpu.get("settings")
    if settings:
        lines += [
            "",
            (f"## Frontend settings, each on a fresh TorchServe (digits 2.0, through the front door), "
            f"{results['rounds']} rounds in turns"),
            "",
            ("Frontend CPU per request without its JIT compiler threads (after a warm-up until they are nearly quiet), "
            "each round; verdict: lower (higher) than the shipped settings in every round, or not."),
            "",
            ("| setting | how | frontend ms/request, each round | median | vs shipped | req/s | frontend PSS MB | "
            "verdict |"),
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, s in settings.items():
            lines.append(f"| {name} | {s['how']} | {', '.join(f'{v:.3f}' for v in s['ms_per_request'])} | "
                         f"{s['median']:.3f} | {s['vs_shipped']:+.0%} | {s['rps']:.0f} | {s['java_pss_mb']:.0f} | "
                         f"{s['verdict']} |")
        shipped = settings["shipped"]["runs"][0]
        asynchronous = Instance.current().properties().get("async_logging", "unset")
        lines += ["", (f"Shipped: an async logger thread {'is' if shipped['async_logger_thread'] else 'is not'} "
                      f"running (async_logging={asynchronous} in config.properties); {shipped['netty_threads']} "
                      "netty event-loop threads."), "", "![frontend CPU per request by setting](footprint_cpu.png)"]
    access = cpu.get("access_log")
    if access:
        more = sum(d > 0 for d in access["differences"])
        lines += [
            "", "## TorchServe's access log without and with predictions, within one TorchServe", "",
            ("One TorchServe (digits 2.0, through the front door), log4j re-reading a copy of log4j2.xml while it "
             "runs: predictions left out of the access log (log4j2.xml as shipped) and every request logged "
             "(ACCESS_LOG_SKIP=none), in turns, each turn in the other order; frontend CPU per request without the "
             "JIT, ms."),
            "", "| turn | predictions not logged | every request logged | difference |",
            "| ---: | ---: | ---: | ---: |",
            *(f"| {i + 1} | {a:.3f} | {b:.3f} | {b - a:+.3f} |"
              for i, (a, b) in enumerate(zip(access["off"], access["on"], strict=False))),
            "",
            (f"Medians: {access['median_off']:.3f} ms without, {access['median_on']:.3f} ms with every request "
             f"logged; difference: median {access['median_difference']:+.3f} ms, higher with every request logged in "
             f"{more} of {len(access['differences'])} turns. Prediction lines written: "
             f"{', '.join(map(str, access['lines_on']))} with, {', '.join(map(str, access['lines_off']))} without."),
        ]
    return lines


PHASE_COLORS = {
    "serve.sh: archives checked (sha256, unpacked), Java chosen": "#9e9e9e",
    "serve.sh: waits until every version is READY": "#d9d9d9",
    "serve.sh: sets defaults, renders and starts the front door": "#616161",
    "front door: waits until it answers ready": "#212121",
    "JVM start to its first log line": "#d62728",
    "config, plugins, metrics": "#9467bd",
    "versions registered one by one": "#8c564b",
    "APIs bound": "#e377c2",
    "registration (archive extracted, or unpacked folder linked)": "#c49c94",
    "worker not spawned yet": "#dbdb8d",
    "Python start-up, TorchServe worker imports": "#17becf",
    "connect, load command": "#1f77b4",
    "handler: imports, model load, warm-up": "#ff7f0e",
    "until the API poll sees READY (the API binds after the last registration)": "#98df8a",
}


def phases(timeline: dict[str, Any]) -> list[dict[str, Any]]:
    """The start-up as (row, phase, start, end) bars: serve.sh and the JVM, then each version and its workers."""
    e = timeline["events"]
    bars = []

    def bar(row: str, phase: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None and end >= start:
            bars.append({"row": row, "phase": phase, "start": start, "end": end})

    bar("serve.sh", "serve.sh: archives checked (sha256, unpacked), Java chosen", 0.0, e["java_spawned"])
    bar("serve.sh", "serve.sh: waits until every version is READY", e["java_spawned"], timeline["all_ready_s"])
    bar("serve.sh", "serve.sh: sets defaults, renders and starts the front door", timeline["all_ready_s"],
        e["nginx_spawned"])
    bar("serve.sh", "front door: waits until it answers ready", e["nginx_spawned"], e["serve_sh_returned"])
    bar("frontend (JVM)", "JVM start to its first log line", e["java_spawned"], e["first_log_line"])
    bar("frontend (JVM)", "config, plugins, metrics", e["first_log_line"], e["first_registration"])
    registrations = [v["registration"] for v in timeline["versions"].values() if v["registration"]]
    if registrations:
        bar("frontend (JVM)", "versions registered one by one", registrations[0][0],
            max(end for _, end in registrations))
        bar("frontend (JVM)", "APIs bound", max(end for _, end in registrations), e["apis_bound"])
    for key, version in timeline["versions"].items():
        if version["registration"]:
            bar(key, "registration (archive extracted, or unpacked folder linked)", *version["registration"])
        for worker in version["workers"]:
            row = f"{key} W-{worker['id']}"
            registered = version["registration"][1] if version["registration"] else None
            bar(row, "worker not spawned yet", registered, worker["spawned"])
            bar(row, "Python start-up, TorchServe worker imports", worker["spawned"], worker["python_up"])
            bar(row, "connect, load command", worker["python_up"], worker["load_command"])
            bar(row, "handler: imports, model load, warm-up", worker["load_command"], worker["handler_ready"])
            bar(row, "until the API poll sees READY (the API binds after the last registration)",
                worker["handler_ready"], worker["ready_polled"])
    return bars


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    bars = phases(results["start"])
    rows = list(dict.fromkeys(bar["row"] for bar in bars))
    with plotted(out / "footprint_timeline.png", figsize=(10, 0.3 * len(rows) + 1.5), tight_box=True) as (_, axis):
        for bar in bars:
            axis.barh(rows.index(bar["row"]), bar["end"] - bar["start"], left=bar["start"], height=0.7,
                      color=PHASE_COLORS.get(bar["phase"], "black"), label=bar["phase"])
        for key, version in results["start"]["versions"].items():
            if version["ready"] is not None:
                axis.plot(version["ready"], rows.index(key) if key in rows else 0, marker="|", color="black",
                          markersize=12)
        axis.axvline(START_TARGET_S, color="red", linestyle="--", linewidth=1, label=f"target {START_TARGET_S:g} s")
        if results["start"]["all_ready_s"]:
            axis.axvline(results["start"]["all_ready_s"], color="black", linestyle=":", linewidth=1,
                         label="every version READY")
        axis.set_yticks(range(len(rows)), labels=rows, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("seconds after serve.sh was spawned")
        axis.set_title("serve.sh start: where the time goes")
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axis.grid(axis="x", alpha=0.3)
    written = [out / "footprint_timeline.png"]

    from matplotlib.patches import Patch

    processes = results["memory"]["processes"]
    with plotted(out / "footprint_pss.png", figsize=(10, 0.3 * len(processes) + 1.8), tight_box=True) as (_, axis):
        kind_colors = {"frontend": "C0", "worker": "C1", "nginx": "C2", "health": "C3", "gateway": "C5"}
        for index, process in enumerate(processes):
            color = kind_colors[process["kind"]]
            if process["kind"] == "worker" and process.get("runtime") == "onnxruntime":
                color = "C4"
            axis.barh(index, process["pss_mb"], color=color, hatch="//" if process.get("torch") else None)
            axis.text(process["pss_mb"], index, f" {process['pss_mb']:.0f}", va="center", fontsize=7)
        axis.axvline(ONNX_WORKER_TARGET_MB, color="red", linestyle="--", linewidth=1,
                     label=f"ONNX Runtime worker target {ONNX_WORKER_TARGET_MB:g} MB")
        handles = [Patch(color="C0", label="frontend (Java)"), Patch(color="C1", label="worker, TorchScript"),
                   Patch(color="C4", label="worker, ONNX Runtime"), Patch(color="C2", label="nginx"),
                   Patch(color="C3", label="health checker"), Patch(color="C5", label="v2 gateway"),
                   Patch(facecolor="white", edgecolor="black", hatch="//", label="torch loaded")]
        axis.set_yticks(range(len(processes)), labels=[p["name"] for p in processes], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("PSS, MB")
        axis.set_title(f"PSS after warm-up: {results['memory']['total_pss_mb']:.0f} MB in all (target "
                       f"{TOTAL_TARGET_MB:g} MB)")
        axis.legend(handles=[*axis.get_legend_handles_labels()[0], *handles], fontsize=7, loc="lower right")
    written.append(out / "footprint_pss.png")

    settings = (results.get("cpu") or {}).get("settings")
    if settings:
        names = list(settings)
        with plotted(out / "footprint_cpu.png", figsize=(10, 0.4 * len(names) + 1.8), tight_box=True) as (_, axis):
            for index, name in enumerate(names):
                axis.barh(index, settings[name]["median"], color="C0" if name != "shipped" else "C7")
                axis.plot(settings[name]["ms_per_request"], [index] * len(settings[name]["ms_per_request"]), "k.")
            axis.axvline(settings["shipped"]["median"], color="black", linestyle=":", linewidth=1)
            axis.set_yticks(range(len(names)), labels=names, fontsize=8)
            axis.invert_yaxis()
            axis.set_xlabel("frontend CPU per request without the JIT, ms (bars: median; dots: each round)")
            axis.set_title("TorchServe frontend settings, digits through the front door, concurrency 16")
        written.append(out / "footprint_cpu.png")
    return written


def measured(row: dict[str, Any]) -> str:
    if row["value"] is None:
        return "not measured"
    return f"{row['value']:.{3 if row['unit'] == 'ms' else 1}f} {row['unit']}"


def goal(row: dict[str, Any]) -> str:
    return "(reported)" if row["goal"] is None else f"<= {row['goal']:g} {row['unit']}"


def targets_table(results: dict[str, Any]) -> str:
    lines = []
    for row in results["targets"]:
        met = "" if row["met"] is None else ("met" if row["met"] else "NOT MET")
        lines.append(f"{row['target'][:100]:<100} {measured(row):>14} {goal(row):>14} {met}")
    return "\n".join(lines)
