"""Hugging Face model folders (export/huggingface.py) to TorchServe: the real all-MiniLM-L6-v2 folder as sentence
embeddings, a sequence classifier fine-tuned here from it, their TorchScript and ONNX exports, and the text classifier
handler on a real ts Context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from export import huggingface
from export.onnx import export_onnx
from export.samples import SENTENCES
from export.torchscript import export_torchscript
from handlers.runtime import OnnxModel, load_torchscript, to_tensors
from handlers.text import TextHandler
from handlers.text_classifier import TextClassifier
from tests.conftest import MINILM_DIR, run_batch, start_handler

LABELS = {0: "negative", 1: "positive"}
REVIEWS = [  # (text, label): short real-world reviews, half each way
    ("What a wonderful, moving film.", 1), ("The food was delicious and the staff were kind.", 1),
    ("I loved every minute of it.", 1), ("A brilliant, funny and warm story.", 1),
    ("The hotel room was clean and quiet.", 1), ("Great value, I would buy it again.", 1),
    ("The film was dull and far too long.", 0), ("The food was cold and the service was rude.", 0),
    ("I hated every minute of it.", 0), ("A boring, clumsy and lifeless story.", 0),
    ("The hotel room was dirty and noisy.", 0), ("It broke after two days, a waste of money.", 0),
]
TRAIN_STEPS = 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SHORT = [text for name, text in SENTENCES.items() if name != "long"]
CONFIG = {"batchSize": 8, "handler": {"max_tokens": 32, "max_texts": 3, "top_k": 5, "explain_steps": 4,
                                      "explain_batch": 4}}


def tokenize(texts: list[str], folder: Path = MINILM_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) as the text handlers collate them (zero-padded to the longest text), as tensors."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    return to_tensors(TextHandler.pad([encoding.ids for encoding in tokenizer.encode_batch(texts)]))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the served workers run: on a shared machine two threads made training 9x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- (a) the real MiniLM folder: sentence embeddings --------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder() -> huggingface.SentenceEncoder:
    return huggingface.load(MINILM_DIR, "sentence_embedding")


def test_minilm_folder_reads_as_sentence_embeddings():
    folder = MINILM_DIR
    assert huggingface.is_model_folder(folder) and not huggingface.is_model_folder(folder / "1_Pooling")
    assert huggingface.task_of(folder) == "sentence_embedding" and huggingface.labels_of(folder) is None
    assert huggingface.tokenizer_file(folder) == folder / "tokenizer.json"
    assert huggingface.max_tokens(folder) == 256  # sentence_bert_config.json's max_seq_length
    assert huggingface.identity(folder) == huggingface.identity(folder) and len(huggingface.identity(folder)) == 64


def test_embeddings_are_the_explained_halves_put_together(encoder):
    """forward is encode_embeddings(embed_tokens(ids)): what explanations attribute between (the embeddings
    themselves are checked against sentence-transformers in test_kinds)."""
    ids, mask = tokenize(SHORT)
    with torch.inference_mode():
        ours = encoder(ids, mask)
        split = encoder.encode_embeddings(encoder.embed_tokens(ids), mask)
    assert ours.shape == (len(SHORT), 384)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SHORT)), atol=1e-5)
    assert max_diff(ours, split) == 0.0


def test_padding_never_changes_an_embedding(encoder):
    ids, mask = tokenize([SENTENCES["cat"]])
    padded_ids, padded_mask = (torch.cat([t, torch.zeros(1, 6, dtype=t.dtype)], dim=1) for t in (ids, mask))
    other_ids = padded_ids.clone()
    other_ids[0, ids.shape[1]:] = 2158  # any ids under a zero mask: still no effect
    with torch.inference_mode():
        alone = encoder(ids, mask)
        assert max_diff(encoder(padded_ids, padded_mask), alone) < 1e-5
        assert max_diff(encoder(other_ids, padded_mask), alone) < 1e-5


def test_traced_encoder_keeps_its_explanation_methods_and_dynamic_shapes(encoder, tmp_path):
    path = export_torchscript(encoder, tokenize(SHORT[:2]), tmp_path / "model.pt",
                              preserve=huggingface.EXPORTED_METHODS)
    traced = load_torchscript(path, torch.device("cpu"), optimize_for_inference=False)
    ids, mask = tokenize(SHORT[2:5])  # another batch size and length than traced with
    with torch.inference_mode():
        expected, words = encoder(ids, mask), encoder.embed_tokens(ids)
        assert max_diff(traced(ids, mask), expected) < 1e-5
        assert max_diff(traced.embed_tokens(ids), words) == 0.0
        assert max_diff(traced.encode_embeddings(words, mask), expected) < 1e-5
        served = load_torchscript(path, torch.device("cpu"), optimize_for_inference=True)
        assert max_diff(served(ids, mask), expected) < 1e-5


# --- (b) a sequence classifier fine-tuned here ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    """BERT for sequence classification from the MiniLM weights, fine-tuned for a few steps on real reviews, saved
    with save_pretrained beside a copy of the tokenizer, as a user hands it over."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(MINILM_DIR), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ids, mask = tokenize([text for text, _ in REVIEWS])
    labels = torch.tensor([label for _, label in REVIEWS])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        assert (model(input_ids=ids, attention_mask=mask).logits.argmax(dim=1) == labels).float().mean() >= 0.75
    folder = tmp_path_factory.mktemp("sentiment")
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def classifier(classifier_folder) -> huggingface.SequenceClassifier:
    return huggingface.load(classifier_folder, "text_classification")


def test_classifier_folder_reads_as_text_classification(classifier_folder):
    assert huggingface.task_of(classifier_folder) == "text_classification"
    assert huggingface.labels_of(classifier_folder) == {"0": "negative", "1": "positive"}
    assert huggingface.max_tokens(classifier_folder) == 512  # tokenizer_config's model_max_length
    assert huggingface.identity(classifier_folder) != huggingface.identity(MINILM_DIR)


def test_classifier_is_the_transformers_model_and_exports_match_eager(classifier, classifier_folder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(str(classifier_folder)).eval()
    example = tokenize(SHORT[:2])
    ids, mask = tokenize([text for text, _ in REVIEWS[4:9]])
    path = export_torchscript(classifier, example, tmp_path / "model.pt", preserve=huggingface.EXPORTED_METHODS)
    traced = load_torchscript(path, torch.device("cpu"), optimize_for_inference=False)
    onnx = OnnxModel(export_onnx(classifier, example, tmp_path / "model.onnx", TextHandler.DYNAMIC_AXES),
                     torch.device("cpu"), threads=1)
    with torch.inference_mode():
        expected, words = classifier(ids, mask), classifier.embed_tokens(ids)
        assert expected.shape == (5, 2)
        assert max_diff(reference(input_ids=ids, attention_mask=mask).logits, expected) < 1e-5
        assert max_diff(traced(ids, mask), expected) < 1e-4
        assert max_diff(traced.encode_embeddings(words, mask), expected) < 1e-4
        assert max_diff(traced.embed_tokens(ids), words) == 0.0
        assert max_diff(torch.from_numpy(onnx(ids, mask)), expected) < 1e-4  # tensors in, numpy out


def test_tracing_preserved_methods_needs_the_models_trace_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"Linear: it has no trace_inputs\(\*example\) giving their example inputs"):
        export_torchscript(torch.nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "model.pt", preserve=("embed_tokens",))


# --- (c) the text classifier handler on a real ts Context ----------------------------------------------------------

@pytest.fixture(scope="module")
def text_classifier(classifier, classifier_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    export_torchscript(classifier, tokenize(SHORT[:2]), folder / "model.pt", preserve=huggingface.EXPORTED_METHODS)
    shutil.copy(huggingface.tokenizer_file(classifier_folder), folder / "tokenizer.json")
    (folder / "index_to_name.json").write_text(json.dumps(huggingface.labels_of(classifier_folder)))
    return start_handler(TextClassifier, folder, CONFIG, "sentiment")


def test_answers_are_the_softmax_of_eager_logits_top_k_capped(text_classifier, classifier):
    handler, context = text_classifier
    texts = [text for text, _ in REVIEWS[:3]]
    single, several = run_batch(handler, context, [texts[0].encode(), {"body": {"texts": texts[1:]}}])
    with torch.inference_mode():
        expected = torch.softmax(classifier(*tokenize(texts)), dim=1)
    answers = [single, *several["predictions"]]
    for answer, row in zip(answers, expected):
        assert len(answer) == 2 and list(answer.values()) == sorted(answer.values(), reverse=True)  # top 5 of 2
        assert abs(answer["negative"] - float(row[0])) < 1e-5 and abs(answer["positive"] - float(row[1])) < 1e-5
    assert several["truncated"] == [False, False]
    assert [context.get_response_headers(i)["X-Input-Truncated"] for i in range(2)] == ["false", "false"]
    items = [handler.decode(texts[0].encode()), handler.decode({"texts": texts[1:]})]
    replies = handler.answer(handler.forward(handler.model, handler.collate(items)), items)
    assert [handler.top_class(reply) for reply in replies] == [next(iter(single)), next(iter(answers[1]))]


def test_a_batch_mixing_good_and_bad_requests_answers_each(text_classifier):
    handler, context = text_classifier
    good, empty, bad_json, long = run_batch(handler, context, [
        {"body": {"text": REVIEWS[0][0]}}, b"  ", b'{"text": "unterminated', SENTENCES["long"].encode()])
    assert [context.get_response_status(i)[0] for i in range(4)] == [200, 400, 400, 200]
    assert empty["error"] == "empty_text" and bad_json["error"] == "bad_json"
    assert set(good) == set(long) == {"negative", "positive"}
    assert context.get_response_headers(3)["X-Input-Truncated"] == "true"


def test_explanation_attributes_the_top_class_to_each_token(text_classifier):
    handler, context = text_classifier
    predicted, explained = run_batch(handler, context, [b"I loved it.", {"body": {"texts": ["I loved it.",
                                                                                              "Dull."]}}], explain={1})
    first, second = explained["explanations"]
    assert first["class"] == next(iter(predicted)) and first["probability"] == pytest.approx(
        predicted[first["class"]], abs=1e-5)
    assert [token for token, _ in first["tokens"]] == ["[CLS]", "i", "loved", "it", ".", "[SEP]"]
    assert [token for token, _ in second["tokens"]] == ["[CLS]", "dull", ".", "[SEP]"]
    assert first["steps"] == 4 and all(isinstance(score, float) for _, score in first["tokens"])
    assert second["class"] in ("negative", "positive") and second["truncated"] is False


# --- (d) folders that cannot be imported -------------------------------------------------------------------------

def copy_without(tmp_path: Path, *left_out: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for path in MINILM_DIR.iterdir():
        if path.is_file() and path.name not in left_out:
            (folder / path.name).symlink_to(path)
    return folder


def test_a_folder_without_tokenizer_json_names_the_fix(tmp_path):
    folder = copy_without(tmp_path, "tokenizer.json")
    with pytest.raises(huggingface.HuggingFaceError) as error:
        huggingface.tokenizer_file(folder)
    message = str(error.value)
    assert "\n" not in message and "slow tokenizer (vocab.txt)" in message
    assert "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)" in message


def test_a_folder_without_config_json_is_not_a_model_folder(tmp_path):
    folder = copy_without(tmp_path, "config.json")
    assert not huggingface.is_model_folder(folder)
    for call in (huggingface.task_of, huggingface.tokenizer_file, huggingface.identity,
                 lambda f: huggingface.load(f, "sentence_embedding")):
        with pytest.raises(huggingface.HuggingFaceError, match="has no config.json: give the folder written by"):
            call(folder)


def test_a_multi_label_head_is_refused(tmp_path):
    folder = copy_without(tmp_path, "config.json")
    config = json.loads((MINILM_DIR / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], problem_type="multi_label_classification")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(huggingface.HuggingFaceError, match="head is multi_label_classification; only single-label"):
        huggingface.task_of(folder)


def test_a_classification_head_missing_from_the_weights_is_refused():
    with pytest.raises(huggingface.HuggingFaceError, match=r"the weights lack 2 tensors text_classification needs"):
        huggingface.load(MINILM_DIR, "text_classification")
