"""``make bench-runtimes``: every model on each runtime, in-process, to choose the one its default version runs on.

For each model: the weights from its default version's source, exported to TorchScript and to ONNX exactly as the
build does, each loaded as the server loads it, one thread. Measured in turns (TorchScript, ONNX Runtime, and again,
``--rounds`` times, so that the host's drift falls on both alike): the forward pass alone on a batch of the model's
``batchSize`` real samples, and the whole pipeline (decode, collate, forward, answer) on the same samples. Prints a
markdown table of medians and the ONNX Runtime / TorchScript ratios.
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
from handlers.runtime import RUNTIME_FILES
from load_test.limit import rate, through


def measure(spec, rounds: int, seconds: float) -> dict[str, dict[str, list[float]]]:
    """{runtime: {"forward": [per round], "pipeline": [per round]}} in items per second."""
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
        results = {runtime: {"forward": [], "pipeline": []} for runtime in models}
        for _ in range(rounds):
            for runtime, model in models.items():
                results[runtime]["forward"].append(rate(lambda: handler.forward(model, inputs), size, seconds))
                results[runtime]["pipeline"].append(rate(lambda: through(handler, model, payloads), size, seconds))
    return results


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
    for name in args.model or sorted(specs):
        spec = specs[name].versions[specs[name].default_version]
        print(f"{name}: measuring ({args.rounds} rounds)", file=sys.stderr, flush=True)
        result = measure(spec, args.rounds, args.seconds)
        median = {(r, kind): statistics.median(v) for r, kinds in result.items() for kind, v in kinds.items()}
        cells = []
        for kind in ("forward", "pipeline"):
            ts, ort = median["torchscript", kind], median["onnxruntime", kind]
            cells += [f"{ts:.1f}", f"{ort:.1f}", f"{ort / ts:.2f} x"]
        rows.append(f"| {name} | {spec.model_config.get('batchSize', 1)} | " + " | ".join(cells) + " |")
    print("\n".join(["Items per second, one thread, medians of runtimes taking turns:", "", *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
