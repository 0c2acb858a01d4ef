"""``make bench-before``: efficientnet_lite0 1.1 served as it is now against as it was served before its workers
stopped importing torch, in one TorchServe, in turns, through the front door: req/s at concurrency 16 and the p50 at
concurrency 1 (wrk, ``load_test/bench.py``'s ``drive``).

"Before" is the same archive with the handler code of commit ``BEFORE`` put back in it (TorchServe's workers run the
handlers their archive carries): torch tensors from decode to answer, TorchServe's ``BaseHandler`` (which imports
torch), an ONNX Runtime memory arena. Both versions have the archive's own settings (2 workers, batches of 2). It
needs the repository's git history; without it there is nothing to compare with, and it says so.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from archives.store import Manifest, store_of
from load_test import inputs, servers
from load_test.bench import drive
from load_test.measure import rewritten
from serving.instance import REPO

BEFORE = "462b7ab"  # the last commit whose handlers imported torch in every worker
MODEL, VERSION = "efficientnet_lite0", "1.1"


def old_source(commit: str, path: str) -> bytes | None:
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], capture_output=True, check=False)
    return shown.stdout if shown.returncode == 0 else None


def before_archive(archive: Path, folder: Path, commit: str = BEFORE) -> Path:
    """A copy of ``archive`` whose handler code (``handlers/*.py`` and the entry module beside them) is the
    repository's at ``commit``."""
    def old_code(name: str, data: bytes) -> bytes:
        if not name.endswith(".py"):
            return data
        return old_source(commit, name if name.startswith("handlers/") else f"handlers/{name}") or data

    return rewritten(archive, folder / f"before_{archive.name}", old_code)


def compare(rounds: int, seconds: float, out: Path) -> dict[str, dict[str, list[float]]]:
    """{"now" | "before": {"rps_c16": [...], "p50_c1_ms": [...]}}, one value per round."""
    manifest = Manifest()
    archive, _ = manifest.verify(MODEL, VERSION)
    store = store_of(out / "store", [(MODEL, VERSION)], manifest)
    files = inputs.write(inputs.photos(), out / "inputs")
    results = {name: {"rps_c16": [], "p50_c1_ms": []} for name in ("now", "before")}
    with servers.torchserve(store, out / "serve") as (ts, _):
        servers.register(ts, before_archive(archive, store), "before", initial_workers=2)
        headers = servers.bearer(ts)
        urls = {"now": f"{ts.inference_url}/predictions/{MODEL}", "before": f"{ts.inference_url}/predictions/before"}
        for number in range(1, rounds + 1):
            for name, url in urls.items():
                busy = drive(name, url, files, 16, seconds, headers)
                alone = drive(name, url, files, 1, seconds, headers)
                results[name]["rps_c16"].append(busy.rps)
                results[name]["p50_c1_ms"].append(alone.p50_ms)
                print(f"round {number}, {name}: {busy.rps:.1f} req/s at c16, p50 {alone.p50_ms:.1f} ms at c1",
                      flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    args = parser.parse_args(argv)
    if old_source(BEFORE, "handlers/base.py") is None:
        print(f"no git history with commit {BEFORE}: nothing to compare with", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="before-") as folder:
        results = compare(args.rounds, args.seconds, Path(folder))
    median = {name: {key: statistics.median(values) for key, values in figures.items()}
              for name, figures in results.items()}
    now, before = median["now"], median["before"]
    print(f"\n{MODEL} {VERSION}, medians of {args.rounds} rounds in turns:")
    print(f"  req/s at c16: now {now['rps_c16']:.1f}, before {before['rps_c16']:.1f} "
          f"({now['rps_c16'] / before['rps_c16']:.2f} x)")
    print(f"  p50 at c1:    now {now['p50_c1_ms']:.1f} ms, before {before['p50_c1_ms']:.1f} ms "
          f"({now['p50_c1_ms'] - before['p50_c1_ms']:+.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
