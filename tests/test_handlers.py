"""Handler unit tests: a real ts Context over a tiny TorchScript model in tmp_path, real photos."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context

from export.samples import encode, photo
from handlers.base import InputError, payload_of
from handlers.image_classifier import ImageClassifier
from handlers.vision import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from tests.conftest import bad_inputs, run_batch, start_handler

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


def make_handler(model_dir: Path, **settings) -> tuple[ImageClassifier, Context]:
    config = {"batchSize": 8, "handler": {"resize": SIZE, "crop": SIZE, **settings}}
    return start_handler(ImageClassifier, model_dir, config)


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
    assert {context.get_response_headers(i)["X-Model-Version"] for i in range(len(payloads))} == {"1.0"}
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
