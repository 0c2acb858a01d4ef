"""``make bench-runtimes``: every model on each runtime, in-process, to choose the one its default version runs on.

For each model: the weights from its default version's source, exported to TorchScript and to ONNX exactly as the
build does, each loaded as the server loads it, one thread. Measured in turns (TorchScript, ONNX Runtime, and again,
``--rounds`` times, so that the host's drift falls on both alike): the forward pass alone on a batch of the model's
``batchSize`` real samples, and the whole pipeline (decode, collate, forward, answer) on the same samples. Prints a
markdown table of medians and the ONNX Runtime / TorchScript ratios.

The same ONNX file also runs on OpenVINO, the candidate not adopted (``load_test/openvino_runtime.py``), in the same
turns: its figures and its largest difference from ONNX Runtime's answers are a second table. And on ONNX Runtime at
each graph optimization level (``OnnxModel.OPTIMIZATIONS``), the forward pass alone, in the same turns: the third
table, which chose the level the server uses (``all``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from archives import load_specs
from build_mar import export_model, handler_class, load_served, stage_extra_files
from export.sources import source_for
from handlers.runtime import RUNTIME_FILES, OnnxModel
from load_test import openvino_runtime
from load_test.limit import rate, through


def measure(spec, rounds: int, seconds: float) -> tuple[dict[str, dict[str, list[float]]], float | None]:
    """{runtime: {"forward": [per round], "pipeline": [per round]}} in items per second, and OpenVINO's largest
    relative difference from ONNX Runtime's outputs (None where OpenVINO is not installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stage_extra_files(spec, work / "extra")
        handler = handler_class(spec.handler).from_config(spec.model_config, files=work / "extra")
        source, params = source_for(spec.source)
        built = source.build(handler, **params)
        size = int(spec.model_config.get("batchSize", 1))
        payloads = (list(built.samples.values()) * size)[:size]
        example = handler.collate([handler.decode(p) for p in payloads[:2]])
        exported = export_model(built.model, handler, spec, example, work, list(RUNTIME_FILES))
        models = {runtime: load_served(path, handler) for runtime, path in exported.items()}
        inputs = handler.collate([handler.decode(p) for p in payloads])
        parity = None
        if openvino_runtime.installed():
            models["openvino"] = openvino_runtime.OpenVinoModel(exported["onnxruntime"], threads=1)
            parity = openvino_runtime.parity(handler, models["onnxruntime"], models["openvino"], inputs)
        models.update({f"level {level}": OnnxModel(exported["onnxruntime"], threads=1, optimization=level)
                       for level in OnnxModel.OPTIMIZATIONS if level != "all"})  # "all" is the served one
        results = {runtime: {"forward": [], "pipeline": []} for runtime in models}
        for _ in range(rounds):
            for runtime, model in models.items():
                results[runtime]["forward"].append(rate(lambda: handler.forward(model, inputs), size, seconds))
                if not runtime.startswith("level "):
                    results[runtime]["pipeline"].append(rate(lambda: through(handler, model, payloads), size,
                                                             seconds))
    return results, parity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--model", action="append", help="only these models (default: every spec)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    specs = load_specs()
    rows = ["| model | batch | forward, TorchScript | forward, ONNX Runtime | ratio | pipeline, TorchScript | "
            "pipeline, ONNX Runtime | ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    levels = ["| model | " + " | ".join(f"{level}{' (served)' if level == 'all' else ''}"
                                         for level in OnnxModel.OPTIMIZATIONS) + " | best | served / best |",
              "| --- |" + " ---: |" * (len(OnnxModel.OPTIMIZATIONS) + 2)]
    candidate = ["| model | forward, OpenVINO | OpenVINO / ONNX Runtime | pipeline, OpenVINO | OpenVINO / ONNX "
                 "Runtime | largest difference |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.model or sorted(specs):
        spec = specs[name].versions[specs[name].default_version]
        print(f"{name}: measuring ({args.rounds} rounds)", file=sys.stderr, flush=True)
        result, parity = measure(spec, args.rounds, args.seconds)
        median = {(r, kind): statistics.median(v) for r, kinds in result.items() for kind, v in kinds.items() if v}
        by_level = {level: median["level " + level if level != "all" else "onnxruntime", "forward"]
                    for level in OnnxModel.OPTIMIZATIONS}
        best = max(by_level, key=by_level.get)
        levels.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in by_level.values())
                      + f" | {best} | {by_level['all'] / by_level[best]:.2f} |")
        cells, openvino = [], []
        for kind in ("forward", "pipeline"):
            ts, ort = median["torchscript", kind], median["onnxruntime", kind]
            cells += [f"{ts:.1f}", f"{ort:.1f}", f"{ort / ts:.2f} x"]
            if parity is not None:
                openvino += [f"{median['openvino', kind]:.1f}", f"{median['openvino', kind] / ort:.2f} x"]
        rows.append(f"| {name} | {spec.model_config.get('batchSize', 1)} | " + " | ".join(cells) + " |")
        if parity is not None:
            candidate.append(f"| {name} | " + " | ".join(openvino) + f" | {parity:.1e} |")
    print("\n".join(["Items per second, one thread, medians of runtimes taking turns:", "", *rows]))
    if len(candidate) > 2:
        print("\n".join(["", "The same ONNX file on OpenVINO, in the same turns (the largest difference is relative to "
                         "ONNX Runtime's largest output):", "", *candidate]))
    else:
        print("\nOpenVINO is not installed: not measured")
    print("\n".join(["", "ONNX Runtime's graph optimization levels, the forward pass alone, items per second (medians, "
                     "in the same turns):", "", *levels]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
