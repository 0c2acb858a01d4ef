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
from handlers.inputs import InputError, payload_of
from handlers.image_classifier import ImageClassifier
from handlers.vision import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from tests.conftest import REPO, bad_inputs, run_batch, start_handler
from tests.corpus import Case, corpus

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


def tiny_model_dir(folder: Path) -> Path:
    traced = torch.jit.trace(Tiny().eval(), torch.zeros(2, 3, SIZE, SIZE))
    torch.jit.save(torch.jit.freeze(traced), str(folder / "model.pt"))
    (folder / "index_to_name.json").write_text(json.dumps(LABELS))
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tiny_model_dir(tmp_path)


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
    assert isinstance(actual, np.ndarray) and actual.dtype == np.float32
    assert float(np.abs(actual - expected.numpy()).max()) < 1e-5


def test_large_jpegs_decode_at_a_reduced_scale_without_changing_the_picture():
    from load_test.inputs import photos

    large = photos()["china@2.5"]  # 1600x1067: decoded at half size, then resized as usual
    exact = ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD, jpeg_draft=False).decode(large).astype(np.float32)
    drafted = ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD).decode(large).astype(np.float32)
    difference = np.abs(exact - drafted)
    assert 0 < float(difference.mean()) < 1.0  # on a 0..255 scale: applied, and within a level on average


def test_grayscale_digit_is_scaled_exactly():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    transform = ImageTransform(8, 8, [0.0], [1.0], color_mode="L")
    batch = transform.collate([transform.decode(encode(digit, "PNG"))])
    assert batch.shape == (1, 1, 8, 8)
    assert np.array_equal(batch[0, 0], digit.astype(np.float32) / np.float32(255.0))


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


# --- the bad-input corpus through every kind of handler ---------------------------------------------------------------
# tests/corpus.py: each case as a client sends it. The front door (nginx) forwards multipart and form-urlencoded bodies
# as application/octet-stream with the client's Content-Type in X-Original-Content-Type; TorchServe's worker parses an
# application/json body (bytes when that fails) and decodes a text/* one (bytes when that fails). ``as_served`` does
# both, so each case reaches the handler exactly as it would through the front door.

FRONT_DOOR_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def as_served(case: Case) -> tuple[dict, dict[str, str]]:
    """(the row TorchServe's worker hands the handler, the request headers the front door adds) for a case."""
    media = case.content_type.split(";")[0].strip().lower()
    if media in FRONT_DOOR_TYPES:
        return {"body": case.body}, {"X-Original-Content-Type": case.content_type}
    value: object = case.body
    try:
        if media == "application/json":
            value = json.loads(case.body.decode("utf-8"))
        elif media.startswith("text"):
            value = case.body.decode("utf-8")
    except Exception:  # noqa: BLE001 (TorchServe's worker passes the bytes on, whatever failed)
        value = case.body
    return {"body": value}, {}


def gray_model_dir(folder: Path) -> Path:
    """A digits-like model: one grayscale channel, 8 x 8."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).eval()
    torch.jit.save(torch.jit.freeze(torch.jit.trace(model, torch.zeros(2, 1, 8, 8))), str(folder / "model.pt"))
    (folder / "index_to_name.json").write_text(json.dumps({str(i): str(i) for i in range(10)}))
    return folder


def tiny_text_dir(folder: Path, task: str) -> Path:
    """A small random BERT (2 layers, 32 wide) with the real MiniLM tokenizer, exported as the build exports one."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from export import huggingface
    from export.torchscript import export_torchscript
    from handlers.text import TextHandler
    from tests.conftest import MINILM_DIR

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    model = (BertForSequenceClassification(config) if task == "text_classification"
             else BertModel(config, add_pooling_layer=False))
    model.eval().save_pretrained(str(folder / "hf"))
    exported = huggingface.load(folder / "hf", task)
    export_torchscript(exported, TextHandler.pad([[101, 2000, 102], [101, 102]]), folder / "model.pt",
                       preserve=huggingface.EXPORTED_METHODS)
    shutil.copy(MINILM_DIR / "tokenizer.json", folder / "tokenizer.json")
    (folder / "index_to_name.json").write_text(json.dumps({"0": "negative", "1": "positive"}))
    return folder


EXPLAIN_TEXT = {"explain_steps": 2, "explain_batch": 2}
EXPLAIN_FAST = {**EXPLAIN_TEXT, "explain_grid": 4}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, tuple]:
    """One handler of each kind the archives serve, configured as archives/*.yaml configures it (max_pixels, resize,
    crop, max_texts), on tiny models: name → (handler, context, corpus kind, a good request)."""
    from export.super_resolution import ESPCN
    from export.torchscript import export_torchscript
    from handlers.sentence_embedding import SentenceEmbedder
    from handlers.super_resolution import SuperResolution
    from handlers.text_classifier import TextClassifier

    folder = tmp_path_factory.mktemp
    espcn = folder("espcn")
    export_torchscript(ESPCN(2), None, espcn / "model.pt", method="script")
    photo_png = {"body": encode(photo("coffee")[:60, :80], "PNG")}
    sentence = {"body": b"a cat sleeps on the sofa"}
    built = {
        "image_classifier": (ImageClassifier, tiny_model_dir(folder("tiny")),
                             {"max_pixels": 40_000_000, **EXPLAIN_FAST}, "image", photo_png),
        "digits": (ImageClassifier, gray_model_dir(folder("digits")),
                   {"color_mode": "L", "resize": 8, "crop": 8, "mean": [0.0], "std": [1.0], "max_pixels": 4_000_000,
                    **EXPLAIN_FAST}, "image", photo_png),
        "super_resolution": (SuperResolution, espcn, {"scale": 2, "max_pixels": 1_000_000}, "image", photo_png),
        "sentence_embedding": (SentenceEmbedder, tiny_text_dir(folder("minilm"), "sentence_embedding"),
                               {"max_tokens": 256, "max_texts": 64, **EXPLAIN_TEXT}, "text", sentence),
        "text_classifier": (TextClassifier, tiny_text_dir(folder("sentiment"), "text_classification"),
                            {"max_texts": 64, **EXPLAIN_TEXT}, "text", sentence),
    }
    return {name: (*start_handler(cls, path, {"batchSize": 8, "handler": settings}, name), kind, good)
            for name, (cls, path, settings, kind, good) in built.items()}


def same_answer(answer, expected) -> bool:
    """The same answer, up to float noise (a text batch is padded to its longest text)."""
    if isinstance(expected, (bytes, str)):
        return answer == expected
    if isinstance(expected, dict):
        return (isinstance(answer, dict) and answer.keys() == expected.keys()
                and all(same_answer(answer[key], value) for key, value in expected.items()))
    if isinstance(expected, list) and expected and isinstance(expected[0], (dict, list, str)):
        return isinstance(answer, list) and len(answer) == len(expected) and all(map(same_answer, answer, expected))
    return bool(np.allclose(answer, expected, atol=1e-5))


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return corpus()


def test_the_corpus_is_deterministic_quick_and_covers_every_category(cases):
    import time

    started = time.perf_counter()
    again = corpus()
    assert time.perf_counter() - started < 3
    assert [(c.name, c.body, c.content_type) for c in again] == [(c.name, c.body, c.content_type) for c in cases]
    assert {c.kind for c in cases} == {"image", "text", "any"}
    reasons = {c.reason for c in cases}
    assert {"not_an_image", "empty_body", "truncated_image", "corrupt_image", "image_too_large", "extreme_aspect_ratio",
            "not_base64", "unexpected_json", "not_utf8", "empty_text", "text_too_long", "body_too_large",
            "too_many_texts", "json_too_deep", "no_text", "bad_json", "bad_multipart", "no_file", "too_many_scans",
            "too_many_segments", "too_much_text"} \
        <= reasons
    types = {c.content_type.split(";")[0] for c in cases}
    assert {"multipart/form-data", "application/x-www-form-urlencoded", "application/json", "text/plain",
            "application/octet-stream", "image/png", ""} <= types
    multipart = [c for c in cases if c.content_type.startswith("multipart/form-data; boundary=")]
    assert all(c.content_type.split("boundary=")[1].strip('"').encode() in c.body for c in multipart
               if c.reason not in ("bad_multipart",))


@pytest.mark.parametrize("name", ["image_classifier", "digits", "super_resolution", "sentence_embedding",
                                  "text_classifier"])
def test_every_bad_input_gets_its_4xx_beside_a_good_request(kinds, cases, name):
    """Each case of the corpus for this kind of model, to /predictions and to /explanations, in a batch after a good
    request: the case gets its status and a JSON body naming its reason, the good request its usual answer, and
    nothing escapes ``handle``."""
    handler, context, kind, good = kinds[name]
    [alone] = run_batch(handler, context, [good])
    explains = name != "super_resolution"
    failures = []
    for case in [case for case in cases if case.kind in (kind, "any")]:
        row, headers = as_served(case)
        for explain in (False, True):
            where = f"{case.name!r} to /{'explanations' if explain else 'predictions'}"
            try:
                results = run_batch(handler, context, [good, row], explain={1} if explain else set(),
                                    headers=[{}, headers])
            except Exception as error:  # noqa: BLE001 (what TorchServe would answer 503 to, for the whole batch)
                failures.append(f"{where}: {type(error).__name__} escaped handle: {error}")
                continue
            status, phrase = context.get_response_status(1)
            expected = case.status
            if explain and not explains and case.status == 200:
                expected, wanted = 400, "no_explanations"
            else:
                wanted = case.reason
            answer = results[1]
            if context.get_response_status(0)[0] != 200 or not same_answer(results[0], alone):
                failures.append(f"{where}: the good request beside it got {context.get_response_status(0)}")
            if expected == 200 and status == 200:
                continue
            if not (400 <= status < 500) or (expected is not None and status != expected):
                failures.append(f"{where}: status {status} ({phrase}), expected {expected or '4xx'}: {answer}")
                continue
            if not (isinstance(answer, dict) and answer.get("code") == status and answer.get("message")
                    and isinstance(answer.get("error"), str) and (wanted is None or answer["error"] == wanted)):
                failures.append(f"{where}: answer {str(answer)[:300]}, expected error {wanted or 'named'}")
            elif "\n" in phrase or "\r" in phrase or len(phrase) > 200:
                failures.append(f"{where}: reason phrase {phrase!r} is not one short line")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


# --- the bounds, one by one -------------------------------------------------------------------------------------------

def refusal(call) -> InputError:
    with pytest.raises(InputError) as caught:
        call()
    return caught.value


def png_of(width: int, height: int) -> bytes:
    return encode(np.zeros((height, width), np.uint8), "PNG")


def test_a_thin_strip_is_refused_from_its_header_before_the_resize(monkeypatch):
    strip = bad_inputs()["extreme aspect ratio"][0]  # 1 x 60000, about 100 bytes
    assert len(strip) < 1000
    classifier = ImageClassifier.from_config({"handler": {"resize": 256, "crop": 224}})
    error = refusal(lambda: classifier.decode(strip))
    assert (error.status, error.reason) == (400, "extreme_aspect_ratio") and "max_aspect_ratio" in error.message
    assert refusal(lambda: classifier.decode(png_of(60_000, 1))).reason == "extreme_aspect_ratio"
    # with the ratio allowed, the resize's own size refuses it: 256 x 15,360,000 pixels, never computed
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized before the bound"))
    anything = ImageClassifier.from_config({"handler": {"resize": 256, "crop": 224, "max_aspect_ratio": 1e9}})
    error = refusal(lambda: anything.decode(strip))
    assert (error.status, error.reason) == (413, "image_too_large")
    assert "256x15360000" in error.message and "the limit is 40.0 MP" in error.message
    monkeypatch.undo()
    panorama = ImageClassifier.from_config({"handler": {"resize": 256, "crop": 224}}).decode(png_of(3000, 100))
    assert panorama.shape == (224, 224, 3)  # 30 : 1 passes the default ratio (32)


def test_a_jpeg_of_a_thousand_scans_is_refused_before_decoding():
    import time

    from tests.corpus import repeated_scans, saved

    def progressive(side: int) -> bytes:
        return saved(Image.new("RGB", (side, side), (40, 90, 160)), "JPEG", progressive=True)

    bomb = repeated_scans(progressive(2000), 1000)  # 4 MP, 30 kB: about 3 s of decoding
    classifier = ImageClassifier.from_config({"handler": {}})
    started = time.perf_counter()
    error = refusal(lambda: classifier.decode(bomb))
    assert time.perf_counter() - started < 0.5
    assert (error.status, error.reason) == (400, "too_many_scans") and "1,010 scans" in error.message
    assert classifier.decode(progressive(600)).shape == (224, 224, 3)  # 10 scans: decoded as usual


def test_super_resolution_refuses_an_image_whose_png_could_exceed_the_answer_limit():
    from handlers.super_resolution import SuperResolution

    small = SuperResolution.from_config({"handler": {"scale": 2, "max_answer_bytes": 100_000}})
    error = refusal(lambda: small.decode(png_of(200, 200)))  # 400 x 400 RGB: up to 480 kB of PNG
    assert (error.status, error.reason) == (413, "image_too_large") and "max_answer_bytes" in error.message
    assert small.decode(png_of(90, 70))[1].shape == (1, 1, 140, 180)
    usual = SuperResolution.from_config({"handler": {}})  # 1 MP in, 4 MP (12 MB) out: within 20 MiB
    usual.check_output(1000, 1000)
    tripled = SuperResolution.from_config({"handler": {"scale": 3}})  # 9 MP out, 27 MB: over it
    assert refusal(lambda: tripled.check_output(1000, 1000)).reason == "image_too_large"


def test_an_answer_over_max_answer_bytes_is_a_413_and_its_neighbours_are_answered(model_dir):
    from handlers.base import encode_answer

    handler, context = make_handler(model_dir, max_answer_bytes=60, top_k=3)
    coffee = encode(photo("coffee"))
    [refused] = handle(handler, context, [coffee])  # three labels, indented as TorchServe writes them: > 60 bytes
    assert context.get_response_status(0)[0] == 413
    assert refused["error"] == "answer_too_large" and "the limit is 60 (max_answer_bytes)" in refused["message"]
    handler.settings["top_k"] = 1
    [answer, text] = handle(handler, context, [coffee, b"nope"])
    assert len(answer) == 1 and text["error"] == "not_an_image"
    # what the worker gets and TorchServe sends: bytes as they are, text in UTF-8, JSON indented as TorchServe would
    nested = {"embeddings": [[0.5] * 384] * 64, "tokens": [9] * 64}
    assert encode_answer(nested) == json.dumps(nested, indent=2).encode()
    assert encode_answer(b"\x89PNG" * 10) == b"\x89PNG" * 10 and encode_answer("é") == "é".encode()


@pytest.fixture(scope="module")
def embedder(kinds):
    return kinds["sentence_embedding"][:2]


def test_deep_json_is_refused_before_parsing(embedder, monkeypatch):
    import time

    import handlers.text

    handler, context = embedder
    monkeypatch.setattr(handlers.text.json, "loads", lambda *a, **k: pytest.fail("parsed"))
    started = time.perf_counter()
    deep, nested_objects = (b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                            b'{"text": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}")
    refused = run_batch(handler, context, [deep, nested_objects, deep.decode()])
    assert time.perf_counter() - started < 2
    for index, answer in enumerate(refused):
        assert context.get_response_status(index)[0] == 400 and answer["error"] == "json_too_deep"
    assert "nests 100,001 deep" in refused[0]["message"]
    # brackets inside strings are text, not nesting
    assert handlers.text.json_depth('{"text": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\" {{{{{{{{{{{{{{{{{{{{{{{"}') == 1


def test_the_json_depth_scan_is_linear_and_exact():
    """Escaped quotes and backslashes decide where strings end: the scan agrees with a parser's depth on tricky
    texts, and a body of escaped quotes (once minutes of a regular expression's backtracking) takes milliseconds."""
    import random
    import time

    from handlers.text import json_depth

    def parsed_depth(value) -> int:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        return 0 if children is None else 1 + max(map(parsed_depth, children), default=0)

    pieces = ["x", '"', "\\", "[", "]{", 'a\\"b', "é", "{}}]", '\\\\"', "\ud800", 1, None]
    rng = random.Random(7)

    def value(level: int):
        roll = rng.random()
        if level > 5 or roll < 0.3:
            return rng.choice(pieces)
        if roll < 0.65:
            return [value(level + 1) for _ in range(rng.randint(0, 3))]
        return {str(rng.choice(pieces)): value(level + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(500):
        tree = value(0)
        text = json.dumps(tree, ensure_ascii=rng.random() < 0.5)
        assert json_depth(text) == parsed_depth(tree), text
    times = {}
    for count in (16_000, 256_000):
        started = time.perf_counter()
        assert json_depth('{"' + '\\"' * count) == 1
        times[count] = time.perf_counter() - started
    assert times[256_000] < 0.5, times  # 16 x the body: linear, not 256 x


def test_a_requests_text_and_a_batchs_word_pieces_are_bounded(embedder):
    handler, context = embedder
    many = {"body": {"texts": ["word " * 3000] * 7}}  # 105,000 characters in 7 texts of 15,000
    long_texts = {"body": {"texts": [" ".join(["cat"] * 300)] * 64}}  # 64 x 256 word pieces: the whole budget
    small = {"body": {"text": "a cat"}}
    answers = run_batch(handler, context, [many, long_texts, small, long_texts])
    statuses = [context.get_response_status(i)[0] for i in range(4)]
    assert statuses == [413, 200, 503, 503]
    assert answers[0]["error"] == "too_much_text" and "105,000 characters" in answers[0]["message"]
    assert answers[2]["error"] == "busy" and "16,384 word pieces (max_batch_tokens)" in answers[2]["message"]
    assert len(answers[1]["embeddings"]) == 64 and all(answers[1]["truncated"])
    # the same small request alone, and an explanation counted at its cost (3 x explain_steps per word piece)
    assert run_batch(handler, context, [small])[0]["tokens"] == 4
    explain = {"body": {"texts": [" ".join(["cat"] * 300)] * 4}}
    run_batch(handler, context, [explain, small], explain={0, 1})
    assert [context.get_response_status(i)[0] for i in range(2)] == [200, 200]  # 4 x 256 x 6 + 4 x 6 <= 16,384


def test_text_bounds_come_before_the_work_they_bound(embedder, monkeypatch):
    handler, context = embedder
    monkeypatch.setattr(handler.tokenizer, "encode_batch", lambda *a, **k: pytest.fail("tokenized"), raising=False)
    rows = [b"word " * 4001, {"body": {"texts": ["ok"] * 65}}, {"body": {"texts": [1] * 100_000}},
            b"x" * (4 * 1024 * 1024 + 1), {"body": {"text": "x\ud800"}}]
    answers = run_batch(handler, context, rows)
    got = [(context.get_response_status(i)[0], answer["error"]) for i, answer in enumerate(answers)]
    assert got == [(413, "text_too_long"), (413, "too_many_texts"), (413, "too_many_texts"),
                   (413, "body_too_large"), (400, "not_utf8")]
    assert "20,005 characters; the limit is 20,000 (max_chars)" in answers[0]["message"]


def test_explanations_are_bounded_in_texts(embedder):
    handler, context = embedder
    nine, eight = {"body": {"texts": ["a cat"] * 9}}, {"body": {"texts": ["a cat"] * 8}}
    predicted, refused, explained = run_batch(handler, context, [nine, nine, eight], explain={1, 2})
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 413, 200]
    assert len(predicted["embeddings"]) == 9 and len(explained["explanations"]) == 8
    assert refused["error"] == "too_many_texts_to_explain" and "max_explained_texts" in refused["message"]


def test_multipart_from_the_front_door_is_parsed_in_the_handler(model_dir):
    from tests.corpus import BOUNDARY, MULTIPART, multipart, part

    handler, context = make_handler(model_dir)
    coffee, rocket = encode(photo("coffee")), encode(photo("rocket"), "PNG")
    [alone_coffee, alone_rocket] = handle(handler, context, [coffee, rocket])
    form = multipart(part("file", rocket, "r.png", "image/png"), part("data", coffee, "c.jpg", "image/jpeg"))
    other = multipart(part("note", b"hi"), part("file", rocket, "r.png"))
    rows = [form, form, form, other, form, form]
    headers = [{"X-Original-Content-Type": MULTIPART}, {"x-original-content-type": MULTIPART},
               {"X-ORIGINAL-CONTENT-TYPE": MULTIPART.upper().replace(BOUNDARY.upper(), BOUNDARY)},
               {"X-Original-Content-Type": MULTIPART},
               {}, {"X-Original-Content-Type": "application/x-www-form-urlencoded"}]
    answers = run_batch(handler, context, rows, headers=headers)
    statuses = [context.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [200, 200, 200, 200, 400, 400]
    assert all(same_answer(answer, alone_coffee) for answer in answers[:3])  # "data" before the first file
    assert same_answer(answers[3], alone_rocket)  # no data or body: the first file, not the text field
    assert answers[4]["error"] == answers[5]["error"] == "not_an_image"  # without the header: the raw body, as today


def test_error_messages_make_one_short_reason_phrase():
    error = InputError("no_text", "keys 'a\r\nb', " + "é" * 5000)
    assert len(error.message) <= 1000 and "\n" not in error.phrase and len(error.phrase) <= 200
    assert error.phrase.isascii() and error.phrase.startswith("keys 'a b'")


def test_a_describe_header_in_a_batch_does_not_fail_the_batch(model_dir):
    handler, context = make_handler(model_dir)
    coffee = encode(photo("coffee"))
    answers = run_batch(handler, context, [coffee, coffee], headers=[{"describe": "True"}, {}])
    assert len(answers) == 2 and [context.get_response_status(i)[0] for i in range(2)] == [200, 200]


def test_an_unforeseen_failure_is_one_requests_500(model_dir, monkeypatch, caplog):
    handler, context = make_handler(model_dir)
    decode = handler.decode
    monkeypatch.setattr(handler, "decode", lambda payload: 1 / 0 if payload == b"boom" else decode(payload))
    with caplog.at_level(logging.ERROR, logger="handlers.base"):
        good, failed = handle(handler, context, [encode(photo("coffee")), b"boom"])
    assert [context.get_response_status(i)[0] for i in range(2)] == [200, 500]
    assert failed["error"] == "internal_error" and "ZeroDivisionError" in caplog.text and len(good) == 3


def test_a_json_null_body_is_empty():
    assert refusal(lambda: payload_of({"body": None})).reason == "empty_body"
    assert refusal(lambda: payload_of({"body": [1, 2]})).reason == "unreadable_body"


def test_a_text_batch_runs_in_groups_of_like_lengths_and_answers_in_order(embedder):
    """One long text among short ones: the short ones run trimmed to their group's longest, the long one alone, and
    every row comes back where it was (the model here sums each row's word pieces and notes the widths it saw)."""
    from handlers.text import length_groups

    handler, _ = embedder
    widths = []

    def model(ids, mask):
        widths.append(ids.shape[1])
        return (ids * mask).sum(axis=1, keepdims=True), mask.sum(axis=1)

    texts = ["a short one", "word " * 200, "another short text", "mid " * 50]
    batch = handler.collate([handler.decode(text.encode()) for text in texts])
    summed, lengths = handler.forward(model, batch)
    lengths_in = batch[1].sum(axis=1).tolist()  # the short texts run with the middle one (under 2 x 32 pieces)
    assert widths == [lengths_in[3], lengths_in[1]] and lengths_in[1] == batch[0].shape[1], widths
    assert summed[:, 0].tolist() == (batch[0] * batch[1]).sum(axis=1).tolist()
    assert lengths.tolist() == batch[1].sum(axis=1).tolist()
    assert [len(group) for group in length_groups(np.array([5, 5, 5]))] == [3]  # short texts: one call
