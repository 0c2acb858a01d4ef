"""Unit tests of the text and image-to-image handlers: real ts Context, real tokenizer, tiny TorchScript models."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from export import huggingface
from export.samples import SENTENCES, encode, photo
from export.super_resolution import ESPCN
from export.torchscript import export_torchscript
from handlers.sentence_embedding import SentenceEmbedder
from handlers.super_resolution import SuperResolution
from handlers.text import TextHandler
from tests.conftest import MINILM_DIR, run_batch, start_handler

TEXT_CONFIG = {"batchSize": 8, "handler": {"max_tokens": 32, "max_texts": 3, "explain_steps": 4, "explain_batch": 4}}


@pytest.fixture(scope="module")
def text_handler(tmp_path_factory):
    """A small random BERT (2 layers, 64 wide) saved as a Hugging Face folder with the real tokenizer, loaded and
    exported as the build exports minilm."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tinylm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    BertModel(config, add_pooling_layer=False).eval().save_pretrained(str(folder / "hf"))
    model = huggingface.load(folder / "hf", "sentence_embedding")
    example = TextHandler.pad([[101, 2000, 102], [101, 102]])
    export_torchscript(model, example, folder / "model.pt", preserve=huggingface.EXPORTED_METHODS)
    shutil.copy(MINILM_DIR / "tokenizer.json", folder / "tokenizer.json")
    return start_handler(SentenceEmbedder, folder, TEXT_CONFIG, "tinylm")


def test_sentence_embeddings_are_batch_invariant_and_unit_length(text_handler):
    handler, context = text_handler
    short, long = SENTENCES["cat"], SENTENCES["rocket"]
    batch = run_batch(handler, context, [short.encode(), {"body": {"texts": [long, short]}}, {"body": {"text": long}}])
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    alone = [run_batch(handler, context, [text.encode()])[0]["embedding"] for text in (short, long)]
    assert np.allclose(batch[0]["embedding"], alone[0], atol=1e-5)  # padded to the batch's longest: no effect
    assert np.allclose(batch[1]["embeddings"], [alone[1], alone[0]], atol=1e-5)
    assert np.allclose(batch[2]["embedding"], alone[1], atol=1e-5)
    assert np.linalg.norm(batch[0]["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert batch[1]["tokens"] == [len(handler.tokenizer.encode(t).ids) for t in (long, short)]


def test_collate_pads_to_the_longest_text_of_the_batch(text_handler):
    handler, _ = text_handler
    items = [handler.decode(text.encode()) for text in (SENTENCES["cat"], SENTENCES["markets"])]
    ids, mask = handler.collate(items)
    lengths = [len(item.encodings[0].ids) for item in items]
    assert ids.shape == mask.shape == (2, max(lengths))
    assert mask.sum(axis=1).tolist() == lengths


def test_long_text_is_truncated_and_says_so(text_handler):
    handler, context = text_handler
    [answer, short] = run_batch(handler, context, [SENTENCES["long"].encode(), SENTENCES["cat"].encode()])
    assert answer["truncated"] is True and answer["tokens"] == 32
    assert context.get_response_headers(0)["X-Input-Truncated"] == "true"
    assert short["truncated"] is False and context.get_response_headers(1)["X-Input-Truncated"] == "false"


@pytest.mark.parametrize("body, status, reason", [
    (b"", 400, "empty_text"),
    (b"   \n", 400, "empty_text"),
    ({"texts": ["fine", ""]}, 400, "empty_text"),
    (b"\xff\xfe caf\xe9", 400, "not_utf8"),
    ({"sentence": "hello"}, 400, "no_text"),
    ({"texts": "not a list"}, 400, "no_text"),
    ([1, 2], 400, "no_text"),
    (b'{"text": "unterminated', 400, "bad_json"),
    ({"texts": ["a", "b", "c", "d"]}, 413, "too_many_texts"),
])
def test_bad_text_gets_a_named_4xx_beside_a_good_request(text_handler, body, status, reason):
    handler, context = text_handler
    bad, good = run_batch(handler, context, [{"body": body}, SENTENCES["cat"].encode()])
    assert context.get_response_status(0)[0] == status and bad["error"] == reason and bad["message"]
    assert context.get_response_status(1)[0] == 200 and len(good["embedding"]) == 64


def test_json_text_as_bytes_and_as_text(text_handler):
    handler, context = text_handler
    as_bytes, as_str, plain = run_batch(handler, context, [json.dumps({"text": "a cat"}).encode(),
                                                           {"body": '{"text": "a cat"}'}, b"a cat"])
    assert as_bytes["embedding"] == as_str["embedding"] == plain["embedding"]


def test_token_explanation_beside_a_prediction(text_handler):
    handler, context = text_handler
    predicted, explained = run_batch(handler, context, [b"a cat sleeps", {"body": {"texts": ["a cat", "dogs"]}}],
                                     explain={1})
    assert "embedding" in predicted
    first, second = explained["explanations"]
    assert [token for token, _ in first["tokens"]] == ["[CLS]", "a", "cat", "[SEP]"]
    assert [token for token, _ in second["tokens"]] == ["[CLS]", "dogs", "[SEP]"]
    assert first["steps"] == 4 and all(isinstance(score, float) for _, score in first["tokens"])


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """An untrained ESPCN: its last layer starts at zero, so it is exactly bicubic on the luma."""
    folder = tmp_path_factory.mktemp("espcn")
    export_torchscript(ESPCN(2), None, folder / "model.pt", method="script")
    return start_handler(SuperResolution, folder, {"handler": {"scale": 2, "max_pixels": 200_000}}, "espcn")


def test_super_resolution_answers_a_png_twice_as_large_per_request(upscaler):
    handler, context = upscaler
    rocket = photo("rocket")
    sizes = [(101, 77), (64, 48), (101, 77)]
    payloads = [encode(rocket[:h, :w], "PNG") for w, h in sizes]
    answers = run_batch(handler, context, payloads)
    for index, ((w, h), body) in enumerate(zip(sizes, answers)):
        image = Image.open(io.BytesIO(body))
        assert image.format == "PNG" and image.size == (2 * w, 2 * h)
        assert context.get_response_headers(index)["content-type"] == "image/png"
        assert context.get_response_headers(index)["X-Output-Size"] == f"{2 * w}x{2 * h}"
        bicubic = Image.open(io.BytesIO(payloads[index])).resize((2 * w, 2 * h), Image.BICUBIC)
        difference = np.abs(np.asarray(image, dtype=float) - np.asarray(bicubic, dtype=float))
        assert difference.mean() < 2.0  # untrained: bicubic, up to YCbCr rounding


def test_super_resolution_refuses_bad_images_and_explanations(upscaler):
    handler, context = upscaler
    big = encode(np.zeros((500, 500, 3), np.uint8), "PNG")
    small = encode(photo("coffee")[:40, :40], "PNG")
    over, text, explained, good = run_batch(handler, context, [big, b"not an image", small, small], explain={2})
    statuses = [context.get_response_status(i)[0] for i in range(4)]
    assert statuses == [413, 400, 400, 200]
    assert over["error"] == "image_too_large" and "the limit is 0.2 MP" in over["message"]
    assert text["error"] == "not_an_image" and explained["error"] == "no_explanations"
    assert Image.open(io.BytesIO(good)).size == (80, 80)


def test_minilm_matches_sentence_transformers_on_real_sentences():
    """The imported folder is all-MiniLM-L6-v2 as its reference library runs it (mean pooling, L2 norm)."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    texts = [SENTENCES[name] for name in ("cat", "kitten", "markets")]
    tokenizer = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    tokenizer.no_padding()
    with torch.inference_mode():
        ours = huggingface.load(MINILM_DIR, "sentence_embedding")(
            *map(torch.from_numpy, TextHandler.pad([e.ids for e in tokenizer.encode_batch(texts)])))
    reference = SentenceTransformer(str(MINILM_DIR), device="cpu").encode(texts, convert_to_tensor=True)
    assert float((ours - reference).abs().max()) < 1e-5
