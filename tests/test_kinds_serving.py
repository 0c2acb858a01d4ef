"""Integration: sentence embeddings, super-resolution and explanations through a real TorchServe (serve.sh)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from export import super_resolution
from export.samples import SENTENCES, photo
from tests.test_serving import worker_pids

pytestmark = pytest.mark.integration

# Boxes around the object, in the photo's pixels (left, top, right, bottom): the cat's face, the espresso cup.
BOXES = {"chelsea": ("cat", (130, 70, 370, 290)), "coffee": ("espresso", (170, 15, 410, 300))}


def post(served, path: str, **kwargs):
    return served.client.request("inference", "POST", path, ok=tuple(range(200, 600)), **kwargs)


def embed(served, text: str) -> np.ndarray:
    response = post(served, "/predictions/minilm", data=text.encode(), headers={"Content-Type": "text/plain"})
    assert response.status_code == 200, response.text
    return np.array(response.json()["embedding"])


def test_similar_sentences_are_closer_than_unrelated_ones(served):
    names = [name for name in SENTENCES if name != "long"]
    response = post(served, "/predictions/minilm", json={"texts": [SENTENCES[n] for n in names]})
    assert response.status_code == 200, response.text
    vectors = dict(zip(names, np.array(response.json()["embeddings"])))
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors.values())
    cosine = {(a, b): float(vectors[a] @ vectors[b]) for a in names for b in names}
    pairs = {("cat", "kitten"), ("espresso", "coffee"), ("rocket", "launch")}
    for a, b in pairs:
        unrelated = [cosine[a, other] for other in names if other not in (a, b)]
        assert cosine[a, b] > max(unrelated) + 0.2, (a, b, cosine[a, b], max(unrelated))


def test_concurrent_requests_are_batched_without_changing_embeddings(served):
    texts = [SENTENCES[name] for name in ("cat", "markets", "launch", "coffee")] * 6
    with ThreadPoolExecutor(12) as pool:
        concurrent = list(pool.map(lambda text: embed(served, text), texts))
    alone = {text: embed(served, text) for text in set(texts)}
    for text, vector in zip(texts, concurrent):
        assert np.abs(vector - alone[text]).max() < 1e-5


def test_long_text_is_truncated_and_the_answer_says_so(served):
    response = post(served, "/predictions/minilm", json={"text": SENTENCES["long"]})
    assert response.status_code == 200 and response.headers["X-Input-Truncated"] == "true"
    assert response.json()["truncated"] is True and response.json()["tokens"] == 256
    short = post(served, "/predictions/minilm", json={"text": SENTENCES["cat"]})
    assert short.headers["X-Input-Truncated"] == "false" and short.json()["truncated"] is False


@pytest.mark.parametrize("body, content_type, reason", [
    (b"", "text/plain", "empty_text"),
    (b"\xff\xfe caf\xe9", "application/octet-stream", "not_utf8"),
    (b'{"sentence": "a cat"}', "application/json", "no_text"),
    (b'{"texts": "a cat"', "application/json", "bad_json"),
])
def test_bad_text_gets_a_named_400_and_the_worker_lives_on(served, body, content_type, reason):
    before = worker_pids(served, "minilm", "1.0")
    response = post(served, "/predictions/minilm", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == reason and response.json()["message"]
    assert worker_pids(served, "minilm", "1.0") == before
    assert len(embed(served, SENTENCES["cat"])) == 384


def test_super_resolution_beats_bicubic_on_a_held_out_photo(served):
    high, payload = super_resolution.held_out(2)["chelsea"]
    response = post(served, "/predictions/super_resolution", data=payload,
                    headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (high.shape[1], high.shape[0])
    assert response.headers["X-Output-Size"] == f"{high.shape[1]}x{high.shape[0]}"
    served_psnr = super_resolution.psnr(np.asarray(image.convert("RGB")), high)
    bicubic_psnr = super_resolution.psnr(super_resolution.bicubic_upscale(payload, 2), high)
    assert served_psnr > bicubic_psnr + 0.1, (served_psnr, bicubic_psnr)


def test_super_resolution_refuses_an_image_over_the_pixel_limit_and_non_images(served, photos):
    huge = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(huge, format="PNG")
    over = served.client.predict("super_resolution", huge.getvalue())
    assert over.status_code == 413 and over.json()["error"] == "image_too_large"
    assert "the limit is 1.0 MP" in over.json()["message"]
    text = served.client.predict("super_resolution", b"not an image")
    assert text.status_code == 400 and text.json()["error"] == "not_an_image"
    assert served.client.predict("super_resolution", photos["coffee"]).status_code == 200


def box_in_grid(box, width: int, height: int, grid: int, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Which cells of the heat map (over the centre crop the classifier sees) lie inside the photo's box."""
    scale_x, scale_y = ((resize / width, int(resize * height / width) / height) if width <= height
                        else (int(resize * width / height) / width, resize / height))
    left, top = round((width * scale_x - crop) / 2), round((height * scale_y - crop) / 2)
    x0, x1 = [(x * scale_x - left) / crop * grid for x in (box[0], box[2])]
    y0, y1 = [(y * scale_y - top) / crop * grid for y in (box[1], box[3])]
    ys, xs = np.mgrid[0:grid, 0:grid] + 0.5
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


@pytest.mark.parametrize("name", list(BOXES))
def test_image_explanation_puts_its_mass_on_the_object(served, photos, name):
    expected, box = BOXES[name]
    response = post(served, "/explanations/efficientnet_lite0", data=photos[name],
                    headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    explanation = response.json()
    predicted = served.client.predict("efficientnet_lite0", photos[name]).json()
    assert explanation["class"] == next(iter(predicted)) and expected in explanation["class"]
    heat = np.array(explanation["heatmap"])
    assert heat.shape == (explanation["grid"],) * 2 and abs(heat.sum() - 1) < 1e-3
    height, width = photo(name).shape[:2]
    inside = box_in_grid(box, width, height, explanation["grid"])
    assert heat[inside].sum() > inside.mean(), (heat[inside].sum(), inside.mean())


def test_text_explanation_weighs_content_words_over_function_words(served):
    response = post(served, "/explanations/minilm", json={"text": SENTENCES["cat"]})
    assert response.status_code == 200, response.text
    [explanation] = response.json()["explanations"]
    scores = dict(explanation["tokens"])
    assert list(scores) == ["[CLS]", "a", "cat", "is", "sleeping", "on", "the", "sofa", ".", "[SEP]"]
    assert min(scores[w] for w in ("cat", "sleeping", "sofa")) > max(scores[w] for w in ("a", "is", "on", "the"))


def test_a_model_without_explanations_says_so(served, photos):
    response = post(served, "/explanations/super_resolution", data=photos["coffee"],
                    headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 400 and response.json()["error"] == "no_explanations"
