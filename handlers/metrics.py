"""Handler metrics through TorchServe's metrics API, every series labelled with the model name and the version that
answered (from the archive's manifest, so a request sent to ``/predictions/<model>`` counts for the real version).

Declared in ``monitoring/metrics.yaml`` (``model_metrics``), which TorchServe's frontend and workers both load; the
frontend exports them on the metrics API. Per batch: preprocess, inference and postprocess time and the batch size
(histograms); per request: the handler time of its batch (histogram), the top-1 class of each answer and the reason
of each refusal (counters). Times are in seconds, to fit the histogram buckets TorchServe uses (5 ms .. 10 s). When a
worker loads, the version's held-out accuracy from its build record (gauge ``handler_accuracy``, top-1 and top-5,
labelled with the evaluation set).

A metric that the metrics configuration does not declare (or a context without metrics, as in the build) is not
recorded: the handler works the same.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

logger = logging.getLogger(__name__)

STEPS = ("preprocess", "inference", "postprocess")
HISTOGRAMS = ("handler_request_seconds", *(f"handler_{step}_seconds" for step in STEPS), "handler_batch_size")
COUNTERS = ("handler_top1_total", "handler_bad_inputs_total")
GAUGES = ("handler_accuracy",)
# build record key → the figure's label: the first figure is labelled with its own name (``metric``: top1, map50,
# mean_iou, macro_auroc), the task's others with theirs
SECOND_FIGURES = ("top5", "map", "pixel_accuracy", "macro_f1")
# TorchServe sends a metric to the frontend as one log line "name.unit:value|#label:value,label:value|...":
# a label value must not contain ',', ':' or '|', nor a line break.
UNSAFE = re.compile(r"[,:|\r\n]+")


def label_value(text: Any) -> str:
    """A label value that survives TorchServe's metric line: "tabby, tabby cat" → "tabby; tabby cat"."""
    return UNSAFE.sub("; ", str(text)).strip() or "-"


class HandlerMetrics:
    """The handler's metrics for one model version; every method is a no-op for a metric that is not declared."""

    def __init__(self, context: Any):
        model = ((getattr(context, "manifest", None) or {}).get("model") or {})
        self.labels = [label_value(model.get("modelName", context.model_name)),
                       label_value(model.get("modelVersion", "unknown"))]
        self.metrics = {}
        cache = getattr(context, "metrics", None)
        if cache is None:
            return
        declared = [(name, MetricTypes.HISTOGRAM) for name in HISTOGRAMS]
        declared += [(name, MetricTypes.COUNTER) for name in COUNTERS]
        declared += [(name, MetricTypes.GAUGE) for name in GAUGES]
        for name, kind in declared:
            try:
                self.metrics[name] = cache.get_metric(name, kind)
            except MetricsCacheKeyError:
                pass
        missing = [name for name, _ in declared if name not in self.metrics]
        if missing:
            logger.warning("not recorded (not declared in the metrics configuration): %s", ", ".join(missing))

    def add(self, name: str, value: float, *labels: Any) -> None:
        metric = self.metrics.get(name)
        if metric is not None:
            metric.add_or_update(value, [*self.labels, *map(label_value, labels)])

    def accuracy(self, record: dict | None) -> None:
        """The version's held-out accuracy (the build record's ``accuracy``), once, when the worker loads."""
        if not record:
            return
        evaluation = (record.get("eval_set") or {}).get("name", "held-out set")
        figures = {record.get("metric", "top1"): record.get("held_out"),
                   **{key: record[key] for key in SECOND_FIGURES if key in record}}
        for k, value in figures.items():
            if isinstance(value, (int, float)):
                self.add("handler_accuracy", value, k, evaluation)

    def record(self, size: int, seconds: dict[str, float], top_classes: list[str], refusals: list[tuple[str, int]]):
        """One batch: its size, each step's time, the top-1 class of each answer, (reason, status) of each refusal."""
        for step, value in seconds.items():
            self.add(f"handler_{step}_seconds", value)
        self.add("handler_batch_size", size)
        total = sum(seconds.values())
        for _ in range(size):
            self.add("handler_request_seconds", total)
        for name in top_classes:
            self.add("handler_top1_total", 1, name)
        for reason, status in refusals:
            self.add("handler_bad_inputs_total", 1, reason, status)
