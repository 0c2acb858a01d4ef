"""Alerts, the autoscaler's metric, and promtool unit tests for both alerts.

Two alerts per model, each per version, from series that exist (``serving/health.py``'s front door counts and the
handler histograms declared in ``monitoring/metrics.yaml``):

* error ratio: the share of the front door's predictions and explanations answered 5xx, by the version that
  answered (``frontdoor_requests_total{api, model, version, status}``), over ``ERROR_RATIO`` for 5 minutes. 4xx are
  the client's bad input and do not count;
* p99 latency: the 99th percentile of ``handler_request_seconds`` (per request, the time its batch spent in the
  handler) by ``model_version``, over the threshold for 10 minutes. The front door's own latency is a running total
  (``frontdoor_request_seconds_total``), an average, which cannot give a percentile.

The autoscaler's metric is a rate, not a counter: prometheus-adapter serves ``frontdoor_requests_per_second`` per
pod from the rate of ``frontdoor_forwarded_requests_total``, the requests the front door passed on to TorchServe,
which on /predictions and /explanations it does only after the key check: a stranger's 401s (and the 405s and 413s
the door answers itself) are not load, and would otherwise let anyone scale the Deployment up. Predictions and
explanations only: the probes' ``/health/*`` requests are counted too, and would otherwise look like load.

Each alert has a promtool unit test (``unit_tests``): a version whose synthetic series should fire it does, after
the alert's ``for``; a version that should not stays silent.
"""

from __future__ import annotations

import re
from typing import Any

from deploy.plan import ModelPlan

ERROR_RATIO = 0.05
P99_SECONDS = 1.0
RATE_WINDOW = "5m"
SERVED_APIS = "predictions|explanations"
RPS_METRIC = "frontdoor_requests_per_second"
RPS_SOURCE = "frontdoor_forwarded_requests_total"  # serving/health.py: passed on, after the key check
ERROR_ALERT = "ModelVersionErrorRatioHigh"
LATENCY_ALERT = "ModelVersionLatencyP99High"


def error_ratio_expr(model: str, threshold: float = ERROR_RATIO) -> str:
    served = f'api=~"{SERVED_APIS}", model="{model}"'
    errors = f'rate(frontdoor_requests_total{{{served}, status=~"5.."}}[{RATE_WINDOW}])'
    total = f"rate(frontdoor_requests_total{{{served}}}[{RATE_WINDOW}])"
    by = "sum by (namespace, model, version)"
    return f"{by} ({errors}) / {by} ({total}) > {threshold:g}"


def p99_expr(model: str, threshold: float = P99_SECONDS) -> str:
    buckets = f'rate(handler_request_seconds_bucket{{model_name="{model}"}}[{RATE_WINDOW}])'
    return (f"histogram_quantile(0.99, sum by (le, namespace, model_name, model_version) ({buckets})) "
            f"> {threshold:g}")


def rule_groups(plan: ModelPlan, error_ratio: float = ERROR_RATIO, p99_seconds: float = P99_SECONDS) -> list[dict]:
    """The PrometheusRule's ``spec.groups`` (also a plain Prometheus rules file)."""
    return [{
        "name": f"torchserve-toolkit.{plan.model}",
        "rules": [
            {
                "alert": ERROR_ALERT,
                "expr": error_ratio_expr(plan.model, error_ratio),
                "for": "5m",
                "labels": {"severity": "critical"},
                "annotations": {
                    "summary": "{{ $labels.model }} {{ $labels.version }}: over "
                               f"{error_ratio:.0%} of requests answered 5xx",
                    "description": "The front door answered more than "
                                   f"{error_ratio:.0%} of {{{{ $labels.model }}}} {{{{ $labels.version }}}}'s "
                                   "predictions and explanations with a 5xx for 5 minutes: roll back "
                                   "(make rollback, or lower the canary's weight).",
                },
            },
            {
                "alert": LATENCY_ALERT,
                "expr": p99_expr(plan.model, p99_seconds),
                "for": "10m",
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": "{{ $labels.model_name }} {{ $labels.model_version }}: p99 handler time over "
                               f"{p99_seconds:g} s",
                    "description": "The 99th percentile of {{ $labels.model_name }} {{ $labels.model_version }}'s "
                                   f"handler time has been over {p99_seconds:g} s for 10 minutes.",
                },
            },
        ],
    }]


def adapter_rules() -> dict[str, Any]:
    """prometheus-adapter's configuration (its ``rules:``, e.g. the Helm chart's ``rules.custom``): the HPA's
    per-pod rate of requests that passed the key check."""
    return {"rules": [{
        "seriesQuery": f'{RPS_SOURCE}{{namespace!="",pod!="",api=~"{SERVED_APIS}"}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{RPS_SOURCE}$", "as": RPS_METRIC},
        "metricsQuery": f'sum(rate(<<.Series>>{{<<.LabelMatchers>>,api=~"{SERVED_APIS}"}}[2m])) by (<<.GroupBy>>)',
    }]}


def _expand(template: str, labels: dict[str, str]) -> str:
    """An annotation as Prometheus renders it, for templates that use only ``{{ $labels.x }}``."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)


def _expected(groups: list[dict], alert: str, labels: dict[str, str]) -> dict[str, Any]:
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == alert)
    return {"exp_labels": {**rule.get("labels", {}), **labels},
            "exp_annotations": {k: _expand(v, labels) for k, v in rule.get("annotations", {}).items()}}


def _test_file(rules_file: str, series: list[dict[str, str]], alert_tests: list[dict[str, Any]]) -> dict[str, Any]:
    """A promtool test file: ``series`` sampled every minute, the rules evaluated every minute, ``alert_tests``."""
    return {"rule_files": [rules_file], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alert_tests}]}


def unit_tests(plan: ModelPlan, groups: list[dict], rules_file: str,
               error_ratio: float = ERROR_RATIO, p99_seconds: float = P99_SECONDS) -> dict[str, dict[str, Any]]:
    """One promtool test file per alert: alert name → the file's content (its ``rule_files`` is ``rules_file``)."""
    model = plan.model
    bad, good = plan.versions[-1].version, plan.versions[0].version
    if bad == good:
        good = f"{bad}-other"  # a model with one version: the silent series is another label value
    errors = int(round(100 * min(1.0, error_ratio * 4)))  # well over the threshold
    few = max(0, int(100 * error_ratio / 5))  # well under it
    door = 'frontdoor_requests_total{{api="predictions",model="{m}",version="{v}",status="{s}",retried="false"}}'
    error_test = _test_file(rules_file, [
        {"series": door.format(m=model, v=bad, s="200"), "values": f"0+{100 - errors}x30"},
        {"series": door.format(m=model, v=bad, s="503"), "values": f"0+{errors}x30"},
        {"series": door.format(m=model, v=good, s="200"), "values": f"0+{100 - few}x30"},
        {"series": door.format(m=model, v=good, s="500"), "values": f"0+{few}x30"},
        # client errors are not the model's: a version refusing bad input stays silent
        {"series": door.format(m=model, v=good, s="400"), "values": "0+50x30"},
    ], [
        {"eval_time": "3m", "alertname": ERROR_ALERT, "exp_alerts": []},  # pending: under its "for"
        {"eval_time": "20m", "alertname": ERROR_ALERT,
         "exp_alerts": [_expected(groups, ERROR_ALERT, {"model": model, "version": bad})]},
    ])
    slow_le, fast_le = _bucket_above(p99_seconds), _bucket_below(p99_seconds)
    bucket = 'handler_request_seconds_bucket{{model_name="{m}",model_version="{v}",le="{le}"}}'
    latency_test = _test_file(rules_file, [
        # the slow version: every request between the threshold and the next bucket boundary up
        {"series": bucket.format(m=model, v=bad, le=_le(_bucket_below(p99_seconds, inclusive=True))),
         "values": "0+0x30"},
        {"series": bucket.format(m=model, v=bad, le=_le(slow_le)), "values": "0+10x30"},
        {"series": bucket.format(m=model, v=bad, le="+Inf"), "values": "0+10x30"},
        # the fast version: every request under a tenth of the threshold
        {"series": bucket.format(m=model, v=good, le=_le(fast_le)), "values": "0+10x30"},
        {"series": bucket.format(m=model, v=good, le=_le(slow_le)), "values": "0+10x30"},
        {"series": bucket.format(m=model, v=good, le="+Inf"), "values": "0+10x30"},
    ], [
        {"eval_time": "8m", "alertname": LATENCY_ALERT, "exp_alerts": []},  # pending: under its "for"
        {"eval_time": "25m", "alertname": LATENCY_ALERT,
         "exp_alerts": [_expected(groups, LATENCY_ALERT, {"model_name": model, "model_version": bad})]},
    ])
    return {ERROR_ALERT: error_test, LATENCY_ALERT: latency_test}


# TorchServe's fixed histogram buckets (the Prometheus Java client's defaults), in seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def _le(value: float) -> str:
    return f"{value:g}"


def _bucket_above(threshold: float) -> float:
    return next((b for b in BUCKETS if b > threshold * 1.5), BUCKETS[-1])


def _bucket_below(threshold: float, inclusive: bool = False) -> float:
    """The highest bucket at or under the threshold (inclusive), else the highest under a tenth of it."""
    limit = threshold if inclusive else threshold / 10
    return max((b for b in BUCKETS if b <= limit), default=BUCKETS[0])
