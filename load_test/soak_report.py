"""The soak's summary and verdict (``load_test/soak.py``): growth per hour of every sampled series, errors, latency,
the goals judged; the printed report and ``soak.png``."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from load_test.measure import fmt, plotted

GOAL_MB_PER_HOUR = 50.0
FD_SLACK = 2  # rise of the descriptor floor still counted as none
TMP_BYTES_SLACK = 1e6  # rise of the temp folder's floor, in bytes, still counted as none (no file may be added)
KEPT_UP = 0.95  # answered / asked rate below which the server fell behind
ERROR_BODIES = 5


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)



def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour; None with fewer than 3 points."""
    if len(points) < 3 or len({t for t, _ in points}) < 2:
        return None
    return statistics.linear_regression(*zip(*points)).slope * 3600


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


def summarize(samples: list[dict[str, Any]], results: list, unsent: int, labels: dict[str, str], rate: float,
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
        lines.append(f"{label:<40} {p['pids'][-1]:>7} {p['pss_mb']:>8.1f} {fmt(p['pss_mb_per_hour'], 1, '+'):>8} "
                     f"{p['private_mb']:>8.1f} {fmt(p['private_mb_per_hour'], 1, '+'):>8} {p['fds']:>5} "
                     f"{fmt(p['fds_per_hour'], 1, '+'):>7} {p['restarts']:>8}")
    tmp = s["tmp"]
    restarts = s["restarts"]
    lines += [
        f"temp folder: {tmp['files']} files ({fmt(tmp['files_per_hour'], 1, '+')}/h), {tmp['bytes'] / 1e6:.1f} MB "
        f"({fmt(None if tmp['bytes_per_hour'] is None else tmp['bytes_per_hour'] / 1e6, 2, '+')} MB/h)",
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

    samples, summary = run["samples"], run["summary"]
    with plotted(path, 2, 1, figsize=(12, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2]}) as (_, axes):
        memory_axis, load_axis = axes
        memory_axis.set_prop_cycle(color=matplotlib.colormaps["tab20"].colors)
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
