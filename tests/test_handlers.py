"""Handler unit tests: a real ts Context over a tiny TorchScript model in tmp_path, real photos."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context

import ts
from export.samples import encode, photo
from handlers.base import InputError, payload_of
from handlers.image_classifier import ImageClassifier
from handlers.vision import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from tests.conftest import REPO, bad_inputs, run_batch, start_handler

SIZE = 32
LABELS = {"0": ["n00000000", "zero"], "1": "one", "2": "two"}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    traced = torch.jit.trace(Tiny().eval(), torch.zeros(2, 3, SIZE, SIZE))
    torch.jit.save(torch.jit.freeze(traced), str(tmp_path / "model.pt"))
    (tmp_path / "index_to_name.json").write_text(json.dumps(LABELS))
    return tmp_path


PROJECT_METRICS = REPO / "monitoring" / "metrics.yaml"
TORCHSERVE_METRICS = Path(ts.__file__).parent / "configs" / "metrics.yaml"  # declares none of the handler metrics


def make_handler(model_dir: Path, metrics_config: Path = PROJECT_METRICS, **settings) -> tuple[ImageClassifier, Context]:
    config = {"batchSize": 8, "handler": {"resize": SIZE, "crop": SIZE, **settings}}
    return start_handler(ImageClassifier, model_dir, config, version="3.1", metrics_config=metrics_config)


def handle(handler: ImageClassifier, context: Context, payloads: list[bytes], explain: set[int] = frozenset()) -> list:
    return run_batch(handler, context, payloads, explain)


def test_transform_matches_torchvision_on_a_real_photo():
    from torchvision import transforms as T

    payload = encode(photo("chelsea"))
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = reference(Image.open(__import__("io").BytesIO(payload)).convert("RGB")).unsqueeze(0)
    transform = ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    actual = transform.collate([transform.decode(payload)])
    assert actual.shape == (1, 3, 224, 224)
    assert float((actual - expected).abs().max()) < 1e-5


def test_large_jpegs_decode_at_a_reduced_scale_without_changing_the_picture():
    from load_test.inputs import photos

    large = photos()["china@2.5"]  # 1600x1067: decoded at half size, then resized as usual
    exact = ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD, jpeg_draft=False).decode(large).float()
    drafted = ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD).decode(large).float()
    difference = (exact - drafted).abs()
    assert 0 < float(difference.mean()) < 1.0  # on a 0..255 scale: applied, and within a level on average


def test_grayscale_digit_is_scaled_exactly():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    transform = ImageTransform(8, 8, [0.0], [1.0], color_mode="L")
    batch = transform.collate([transform.decode(encode(digit, "PNG"))])
    assert batch.shape == (1, 1, 8, 8)
    assert torch.equal(batch[0, 0], torch.from_numpy(digit).float() / 255.0)


def test_answer_is_top_k_labels_highest_first(model_dir):
    handler, context = make_handler(model_dir, top_k=2)
    [answer] = handle(handler, context, [encode(photo("coffee"))])
    assert len(answer) == 2
    assert set(answer) <= {"zero", "one", "two"}  # list-valued labels show their last item
    probabilities = list(answer.values())
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6


def test_mixed_batch_fails_only_the_bad_requests(model_dir):
    handler, context = make_handler(model_dir, max_pixels=40_000_000)
    good = [encode(photo("coffee")), encode(photo("rocket"), "PNG")]
    bad = bad_inputs()
    payloads = [good[0]] + [payload for payload, _, _ in bad.values()] + [good[1]]
    results = handle(handler, context, payloads)
    statuses = [context.get_response_status(index)[0] for index in range(len(payloads))]
    assert len(results) == len(payloads)
    assert {context.get_response_headers(i)["X-Model-Version"] for i in range(len(payloads))} == {"3.1"}
    singles = [handle(handler, context, [g])[0] for g in good]
    for index, expected in ((0, singles[0]), (len(payloads) - 1, singles[1])):
        assert statuses[index] == 200
        assert results[index].keys() == expected.keys()
        assert np.allclose(list(results[index].values()), list(expected.values()), atol=1e-6)
    for index, (name, (_, status, reason)) in enumerate(bad.items(), start=1):
        assert statuses[index] == status, name
        assert results[index]["error"] == reason, name
        assert results[index]["code"] == status and results[index]["message"], name


def test_a_batch_of_only_bad_requests_answers_each(model_dir):
    handler, context = make_handler(model_dir)
    results = handle(handler, context, [b"nope", b""])
    assert [r["error"] for r in results] == ["not_an_image", "empty_body"]


def test_unknown_setting_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown handler settings.*topk"):
        make_handler(model_dir, topk=3)


def test_payload_forms():
    png = encode(photo("coffee"), "PNG")
    assert payload_of({"data": png}) == png
    assert payload_of({"body": bytearray(png)}) == png
    assert payload_of({"file": png}) == png  # multipart under another field name
    assert payload_of({"body": base64.b64encode(png).decode()}) == png
    for row, reason in (({"body": "not base64!"}, "not_base64"), ({"body": {"a": 1}}, "unexpected_json"),
                        ({"body": b""}, "empty_body"), ({"name": "value"}, "no_file")):
        with pytest.raises(InputError) as caught:
            payload_of(row)
        assert caught.value.reason == reason and caught.value.status == 400


def test_explanation_names_its_class_and_gives_a_heat_map_beside_predictions(model_dir):
    handler, context = make_handler(model_dir, explain_grid=4, explain_steps=8, explain_batch=8)
    coffee = encode(photo("coffee"))
    predicted, explained, refused = handle(handler, context, [coffee, coffee, b"nope"], explain={1, 2})
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 400]
    assert explained["class"] == next(iter(predicted)) and explained["probability"] == pytest.approx(
        next(iter(predicted.values())), abs=1e-5)
    assert explained["grid"] == 4 and len(explained["heatmap"]) == 4 and {len(r) for r in explained["heatmap"]} == {4}
    assert sum(map(sum, explained["heatmap"])) == pytest.approx(1.0, abs=1e-3)
    assert explained["steps"] == 8 and explained["convergence_delta"] < 0.05
    assert refused["error"] == "not_an_image"


# What a worker prints for a metric and TorchServe's frontend parses (org.pytorch.serve.metrics.Metric):
# [METRICS]name.unit:value|#label:value,label:value|#type:HISTOGRAM|#hostname:host,timestamp
METRIC_LINE = re.compile(r"\[METRICS\](\w+)\.(\w+):([0-9.e-]+)\|#([^|]*)\|#type:(\w+)\|#hostname:[^,]+,\d+")


def emitted(caplog) -> list[tuple[str, float, dict[str, str], str]]:
    """(name, value, labels, type) of each metric line the handler emitted, parsed as the frontend parses them."""
    found = []
    for record in caplog.records:
        match = METRIC_LINE.fullmatch(record.getMessage())
        if match:
            name, _, value, labels, kind = match.groups()
            pairs = [pair.split(":") for pair in labels.split(",")]
            assert all(len(pair) == 2 for pair in pairs), labels  # the frontend drops any other label
            found.append((name, float(value), dict(pairs), kind))
    return found


def test_a_batch_emits_per_version_metrics(model_dir, caplog):
    handler, context = make_handler(model_dir)
    handler.mapping = {"0": "tabby, tabby cat", "1": "one: the first", "2": "two|2"}  # separators TorchServe splits on
    bad = bad_inputs()
    payloads = [encode(photo("coffee")), bad["text"][0], encode(photo("rocket"), "PNG"), bad["over pixel limit"][0]]
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        results = handle(handler, context, payloads)
    metrics = [metric for metric in emitted(caplog) if metric[0].startswith("handler_")]
    assert all(labels["model_name"] == "tiny" and labels["model_version"] == "3.1" for _, _, labels, _ in metrics)

    def values(name: str) -> list[float]:
        return [value for metric, value, _, _ in metrics if metric == name]

    assert values("handler_batch_size") == [4.0]
    steps = {step: values(f"handler_{step}_seconds") for step in ("preprocess", "inference", "postprocess")}
    assert all(len(seconds) == 1 and 0 < seconds[0] < 60 for seconds in steps.values()), steps
    assert values("handler_request_seconds") == [pytest.approx(sum(s[0] for s in steps.values()), abs=1e-9)] * 4
    assert {kind for metric, _, _, kind in metrics if metric.endswith("_seconds")} == {"HISTOGRAM"}

    top1 = [labels["class"] for metric, _, labels, _ in metrics if metric == "handler_top1_total"]
    shown = {"tabby, tabby cat": "tabby; tabby cat", "one: the first": "one; the first", "two|2": "two; 2"}
    assert top1 == [shown[next(iter(answer))] for answer in results[::2]]
    refused = [(labels["reason"], labels["status"]) for metric, _, labels, _ in metrics
               if metric == "handler_bad_inputs_total"]
    assert sorted(refused) == [("image_too_large", "413"), ("not_an_image", "400")]


def test_handler_works_where_the_metrics_are_not_declared(model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="handlers.metrics"):
        handler, context = make_handler(model_dir, metrics_config=TORCHSERVE_METRICS)
    assert "not recorded" in caplog.text and "handler_request_seconds" in caplog.text
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        [answer, refused] = handle(handler, context, [encode(photo("coffee")), b"nope"])
    assert len(answer) == 3 and refused["error"] == "not_an_image"
    assert not [m for m in emitted(caplog) if m[0].startswith("handler_")]
