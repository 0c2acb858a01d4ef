"""``make bench-quantize``: fp32 against INT8 in-process, in one run, for efficientnet_lite0 (ImageNet weights, the
sample photos: agreement only, there is no ImageNet set here), minilm (the sample sentences: cosine) and the example
project's ResNet-18 trained here (its held-out folder: top-1). Each INT8 file is made as the build makes it
(``export/quantize.py``), then both are compared and timed in alternate rounds: the whole pipeline (decode, collate,
forward, answer) and the forward pass alone, at the model's served batch size. The ResNet-18 is also served as a user
ships it (``served``): ``make import`` with ``QUANTIZE=int8``, then both versions through the front door. Writes
``quantize.json``, ``quantize.md`` and ``quantize.png`` into ``--out`` (default ``load_test/results/``). The forward
pass is also timed on OpenVINO, the candidate runtime (``load_test/openvino_runtime.py``), on the same two files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from archives.store import Manifest
from export.quantize import (
    Calibration,
    compare,
    fp32_from_store,
    mode_for,
    quantize_file,
    speed,
)
from load_test import openvino_runtime
from load_test.bench_report import INT8_MIN_AGREEMENT
from load_test.measure import made, plotted, quantized_store

RESULTS = Path(__file__).resolve().parent / "results"
SERVED_CONCURRENCY = 16
SERVED_ROUNDS = 3  # fp32 and INT8 take turns, this many times each
SERVED_SECONDS = 10.0

def fp32_onnx(spec, handler, into: Path) -> Path:
    """A version's fp32 ONNX file: from its archive in the store, else exported from its source."""
    found = fp32_from_store(Manifest(), spec.model, spec.version, spec.source, into)
    if found:
        return found["onnxruntime"]
    from export.onnx import export_onnx, model_call
    from export.sources import source_for

    source, params = source_for(spec.source)
    built = source.build(handler, **params)
    example = handler.collate([handler.decode(p) for p in list(built.samples.values())[:2]])
    return export_onnx(built.model, model_call(built.model, handler.forward, example), into / "fp32.onnx",
                       handler.DYNAMIC_AXES)


def bench_model(name: str, handler, fp32_file: Path, mode: str, data: tuple[list[bytes], str], batch: int,
                truth: tuple[list[int], dict] | None = None) -> dict:
    """One model's figures: INT8 made as the build makes it (calibrated on ``data``, static), then both compared,
    measured (top-1 where ``truth`` gives the labels) and timed at ``batch`` on ``data``."""
    from export.accuracy import classification
    from handlers.runtime import OnnxModel

    payloads, set_name = data
    int8_file = fp32_file.with_name(f"{fp32_file.stem}.int8.onnx")
    quantize_file(fp32_file, int8_file, mode, handler, Calibration(set_name, payloads) if mode == "static" else None)
    threads = int(handler.settings["threads"])
    fp32, int8 = OnnxModel(fp32_file, threads=threads), OnnxModel(int8_file, threads=threads)
    row = {"model": name, "mode": mode, "set": f"{set_name} ({len(payloads)})", "batch": batch,
           "mb": (fp32_file.stat().st_size / 1e6, int8_file.stat().st_size / 1e6),
           **compare(handler, fp32, int8, payloads, name.startswith("minilm"))}
    if truth is not None:
        row["top1"] = tuple(classification(m, handler, payloads, truth[0], set_name, truth[1])["held_out"]
                            for m in (fp32, int8))
    models = {"fp32": fp32, "int8": int8}
    row["pipeline"] = speed(handler, models, payloads, batch)
    if openvino_runtime.installed():  # the candidate runtime on the same two files, in the same turns
        models.update({f"{precision} openvino": openvino_runtime.OpenVinoModel(path, threads)
                       for precision, path in (("fp32", fp32_file), ("int8", int8_file))})
    row["forward"] = speed(handler, models, payloads, batch, "model")
    return row


def bench() -> list[dict]:
    """efficientnet_lite0 (ImageNet weights, the sample photos: agreement only, there is no ImageNet set here), minilm
    (the sample sentences: cosine) and the example project's ResNet-18 trained here (its held-out folder: top-1)."""
    import shutil

    from archives import load_specs
    from export.datasets import as_mapping, read_eval
    from export.example_project import write_project
    from export.onnx import export_onnx
    from export.preprocessing import settings_from_transform
    from export.samples import samples_for
    from export.sources import source_for
    from handlers import handler_class
    from handlers.runtime import to_tensors
    from load_test import inputs

    rows, specs = [], load_specs()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for model, min_agreement in (("efficientnet_lite0", INT8_MIN_AGREEMENT), ("minilm", None)):
            spec = specs[model].versions[specs[model].default_version]
            folder = Path(tmp) / model
            folder.mkdir()
            source, params = source_for(spec.source)
            for file_name, path in (source.files(**params) if source.files else {}).items():
                shutil.copy2(path, folder / file_name)
            handler = handler_class(spec.handler).from_config(spec.model_config, files=folder)
            samples = samples_for(handler)
            rows.append(bench_model(f"{model} {spec.version}", handler, fp32_onnx(spec, handler, folder),
                                    mode_for(spec.handler), (list(samples.values()), "samples"),
                                    int(spec.model_config.get("batchSize", 1))))
            home = Path(tmp) / f"served-{model}"  # quantized as a user does it, beside the shipped fp32 version
            store, int8 = quantized_store(specs[model].path, model, spec.version, home, min_agreement)
            rows[-1]["served"] = served_rounds(store, home, model, (spec.version, int8),
                                               samples if model == "minilm" else inputs.photos())
        project = write_project(Path(tmp) / "project")
        handler = handler_class("image_classifier").from_config(
            {"handler": settings_from_transform(project.code.eval_transform())})
        held_out, labels = read_eval(project.eval_dir), as_mapping(project.labels)
        example = handler.collate([handler.decode(p) for p in held_out.payloads[:2]])
        fp32_file = export_onnx(project.resnet, to_tensors((example,)), Path(tmp) / "resnet18.onnx",
                                handler.DYNAMIC_AXES)
        rows.append(bench_model("example resnet18", handler, fp32_file, "static", (held_out.payloads, "val/"), 4,
                                (held_out.indices(labels), labels)))
        rows[-1]["served"] = served(project, Path(tmp) / "served")
    return rows


def served(project, home: Path) -> dict:
    """The example ResNet-18 as a user ships it: ``make import ... QUANTIZE=int8`` into a store of its own (1.0 fp32,
    1.1 INT8, gated), both versions served (``served_rounds``) on its eval photos."""
    store = made(home, ["import", "photos", str(project.root / "resnet18.pth"), "--arch", "torchvision:resnet18",
                        "--eval", str(project.eval_dir), "--transform", "train:eval_transform", "--code",
                        str(project.root), "--quantize", "int8"])
    photos = {path.stem: path.read_bytes() for path in sorted(project.eval_dir.rglob("*")) if path.is_file()}
    return served_rounds(store, home, "photos", ("1.0", "1.1"), photos)


def served_rounds(store: Path, home: Path, model: str, versions: tuple[str, str], photos: dict[str, bytes]) -> dict:
    """Both versions (fp32, INT8) of ``model`` served by serve.sh from ``store``, driven through the front door at
    SERVED_CONCURRENCY in alternate turns: the median req/s and p50 of each, and their ratio."""
    from load_test import inputs
    from load_test.bench import drive
    from load_test.servers import bearer, torchserve

    files = inputs.write(photos, home / "inputs")
    runs: dict[str, list] = {version: [] for version in versions}
    with torchserve(store, home / "serve") as (ts, _):
        for _ in range(SERVED_ROUNDS):
            for version, points in runs.items():
                points.append(drive(f"{model} {version}", f"{ts.inference_url}/predictions/{model}/{version}", files,
                                    SERVED_CONCURRENCY, SERVED_SECONDS, bearer(ts)))
    named = dict(zip(("fp32", "int8"), runs.values()))
    rps = {name: statistics.median(p.rps for p in points) for name, points in named.items()}
    return {"concurrency": SERVED_CONCURRENCY, "versions": list(versions), **rps, "speedup": rps["int8"] / rps["fp32"],
            "failed": sum(p.failed for ps in runs.values() for p in ps),
            "p50_ms": {name: statistics.median(p.p50_ms for p in points) for name, points in named.items()},
            "rounds": {name: [round(p.rps, 1) for p in points] for name, points in named.items()}}


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<22} {'mode':<8} {'set (n)':<12} {'MB fp32→int8':>14} {'batch':>5} {'pipeline /s fp32→int8':>24} "
             f"{'forward /s fp32→int8':>24} {'top-1 fp32→int8':>16}  agreement / cosine"]
    for r in rows:
        figure = (f"agreement {r['agreement']:.3f} ({r['agreeing']}/{r['samples']})" if "agreement" in r else
                  f"cosine {r['cosine']:.4f} (min {r['min_cosine']:.4f})")
        top1 = f"{r['top1'][0]:.3f}→{r['top1'][1]:.3f}" if "top1" in r else "-"
        speeds = [f"{s['fp32']:.1f}→{s['int8']:.1f} (x{s['speedup']:.2f})" for s in (r["pipeline"], r["forward"])]
        lines.append(f"{r['model']:<22} {r['mode']:<8} {r['set']:<12} {r['mb'][0]:>6.1f}→{r['mb'][1]:<6.1f} "
                     f"{r['batch']:>5} {speeds[0]:>24} {speeds[1]:>24} {top1:>16}  {figure}")
    for r in rows:
        if "fp32 openvino" in r["forward"]:
            f = r["forward"]
            lines.append(f"{r['model']}: forward on OpenVINO, same files and turns: fp32 {f['fp32 openvino']:.1f} "
                         f"(x{f['fp32 openvino'] / f['fp32']:.2f} of ONNX Runtime), INT8 {f['int8 openvino']:.1f} "
                         f"(x{f['int8 openvino'] / f['int8']:.2f})")
    for r in rows:
        if "served" in r:
            s = r["served"]
            lines.append(f"\n{r['model']} served through the front door at concurrency {s['concurrency']} (versions "
                         f"{' and '.join(s['versions'])}; medians of {len(s['rounds']['fp32'])} alternate rounds): fp32 "
                         f"{s['fp32']:.1f} req/s, INT8 {s['int8']:.1f} req/s (x{s['speedup']:.2f}); p50 "
                         f"{s['p50_ms']['fp32']:.0f} → {s['p50_ms']['int8']:.0f} ms; {s['failed']} failed")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Items per second, fp32 beside INT8, per model: the whole pipeline and the forward pass alone, in-process; and
    requests per second served through the front door, where measured."""
    panels = [(stages, f"{stages} in-process, items per second", rows) for stages in ("pipeline", "forward")]
    panels.append(("served", f"served at concurrency {SERVED_CONCURRENCY}, req/s", [r for r in rows if "served" in r]))
    with plotted(path, 1, 3, figsize=(15, 4.5)) as (figure, axes):
        for axis, (stages, title, shown) in zip(axes, panels):
            for offset, precision in ((-0.2, "fp32"), (0.2, "int8")):
                values = [row[stages][precision] for row in shown]
                bars = axis.bar([i + offset for i in range(len(shown))], values, 0.4, label=precision.upper())
                axis.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8, padding=1)
            axis.set_xticks(range(len(shown)), fontsize=8,
                            labels=[f"{r['model']}\n× {r[stages]['speedup']:.2f}" for r in shown])
            axis.set_title(f"{title} (more is better)", fontsize=10)
            axis.grid(axis="y", alpha=0.3)
            axis.legend(fontsize=8)
        figure.suptitle("fp32 against INT8 (ONNX Runtime)", fontsize=11)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from export import configure_logging

    configure_logging()
    rows = bench()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.json").write_text(json.dumps(rows, indent=1))
    (args.out / "quantize.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "quantize.png")
    print(table(rows))
    print(f"\nwritten: {args.out / 'quantize.json'}, quantize.md, quantize.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
