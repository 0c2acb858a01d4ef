"""No request holds a worker for long, and registration never leaves the model store.

* Poison bodies of every kind we know, each at growing sizes up to the limits, through the real front door to the
  text and image models, predictions and explanations: every answer a 4xx in under ``POISON_SECONDS``, and every
  worker the same process afterwards (before, 64 KB of escaped quotes took a text worker 8.6 s and 130 KB killed it).
* A request that outlives its model's limit is answered 504 naming the limit by the front door and is not sent to
  another worker: one worker restart, not one per retry.
* Registration through the front door's management port: only ``POST /models`` with an archive of the store, however
  the path, the parameters or the body are spelled.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import pytest
import requests
from PIL import Image

from archives import check_model_name, check_version
from archives.store import Manifest, sha256_file, store_of
from load_test.servers import reconfigured
from serving.instance import Instance
from tests.conftest import instance, ready_pids
from tests.corpus import (
    MULTIPART,
    chunk,
    commented_gif,
    filled_jpeg,
    multipart,
    padded_png,
    part,
)

# the longest a refusal may take, a 20 MiB upload through both nginx passes included: a tenth of the models'
# responseTimeout (30 s), which a poison that held its worker would reach (1 s flaked at 1.009 s on 2 cores)
POISON_SECONDS = 3.0
SIZES = (64 << 10, 1 << 20, 4 << 20)  # bytes (each kind is refused from the first: 64 KiB of text is over max_chars)
IMAGE_SIZE = 20 << 20  # under the front door's 25 MiB


def sized(unit: bytes, size: int, head: bytes = b"", tail: bytes = b"") -> bytes:
    """``head``, then ``unit`` repeated to about ``size`` bytes, then ``tail``."""
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


def small_image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", (8, 8), 40).save(buffer, fmt)
    return buffer.getvalue()


def text_chunks_png(size: int) -> bytes:
    """A PNG with as many one-entry tEXt chunks as fit in ``size``."""
    text = chunk(b"tEXt", b"k\x00v")
    png = small_image("PNG")
    return png[:33] + text * (size // len(text)) + png[33:]


def many_parts(size: int) -> bytes:
    one = part("f", b"x")
    return multipart(*[one] * max(1, size // len(one)))


# name → (body of about ``size`` bytes, its Content-Type)
TEXT_POISON: dict[str, Callable[[int], tuple[bytes, str]]] = {
    "escaped quotes": lambda size: (sized(b'\\"', size, b'{"'), "text/plain"),
    "escaped quotes as json": lambda size: (sized(b'\\"', size, b'{"'), "application/json"),
    "backslashes in an open string": lambda size: (sized(b"\\\\", size, b'{"text": "'), "text/plain"),
    "open brackets": lambda size: (sized(b"[", size, b'{"texts": '), "text/plain"),
    "tiny texts": lambda size: (sized(b'"a",', size, b'{"texts": [', b'"a"]}'), "application/json"),
    "many keys": lambda size: (b"{" + b",".join(b'"k%d": 0' % i for i in range(size // 10)) + b"}",
                               "text/plain"),
    "a number of many digits": lambda size: (sized(b"1", size, b'{"text": ', b"}"), "text/plain"),
    "unicode escapes in an open string": lambda size: (sized(b"\\u00e9", size, b'{"text": "'), "text/plain"),
    "cjk text": lambda size: (sized("中".encode(), size), "text/plain"),
    "punctuation": lambda size: (sized(b"!", size), "text/plain"),
    "many multipart parts": lambda size: (many_parts(size), MULTIPART),
}
IMAGE_POISON: dict[str, Callable[[int], tuple[bytes, str]]] = {
    "empty png chunks": lambda size: (padded_png(small_image("PNG"), size // 12), "application/octet-stream"),
    "png text chunks": lambda size: (text_chunks_png(size), "application/octet-stream"),
    "jpeg fill bytes": lambda size: (filled_jpeg(small_image("JPEG"), size), "application/octet-stream"),
    "gif comment blocks": lambda size: (commented_gif(small_image("GIF"), size // 2), "application/octet-stream"),
    "random bytes": lambda size: (bytes(range(256)) * (size // 256), "application/octet-stream"),
    "many multipart parts": lambda size: (many_parts(size), MULTIPART),
}


def every_worker(client) -> dict[tuple[str, str], list[int]]:
    return {key: ready_pids(client, *key) for key in client.registered()}


def test_poison_bodies_are_refused_at_once_and_no_worker_restarts(served):
    client = served.client
    front = served.env["PROXY_ADDRESS"]
    key = {"Authorization": f"Bearer {client.token('inference')}"}
    before = every_worker(client)
    answers = []
    targets = [("minilm", TEXT_POISON, SIZES), ("efficientnet_lite0", IMAGE_POISON, (*SIZES, IMAGE_SIZE)),
               ("super_resolution", IMAGE_POISON, SIZES)]
    with requests.Session() as session:
        for model, kinds, sizes in targets:
            for api in ("predictions", "explanations"):
                for name, make in kinds.items():
                    for size in sizes:
                        body, content_type = make(size)
                        started = time.perf_counter()
                        response = session.post(f"{front}/{api}/{model}", data=body, timeout=60,
                                                headers={**key, "Content-Type": content_type})
                        answers.append((model, api, name, len(body), response.status_code,
                                        time.perf_counter() - started, response.text[:120]))
    slow = [answer for answer in answers if answer[5] >= POISON_SECONDS]
    failed = [answer for answer in answers if not 400 <= answer[4] < 500]
    assert not failed, failed[:5]
    assert not slow, slow[:5]
    assert len(answers) == 2 * (len(TEXT_POISON) * 3 + len(IMAGE_POISON) * 7)
    assert every_worker(client) == before  # no worker died, none was replaced
    print(f"\n{len(answers)} poison requests, slowest {max(a[5] for a in answers):.3f} s, "
          f"largest {max(a[3] for a in answers):,} bytes, all 4xx")


# --- a request that outlives its model's limit ---------------------------------------------------------------------

RESPONSE_TIMEOUT = 2  # s: minilm's responseTimeout on the instance below; the front door waits 1 s less


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    """minilm 1.1 alone on its own TorchServe, its archive's responseTimeout cut to RESPONSE_TIMEOUT: a request of
    64 long texts (about 4 s of MiniLM on one thread) outlives it."""
    home = tmp_path_factory.mktemp("impatient")
    store = store_of(home / "store", [("minilm", "1.1")])
    manifest = Manifest(store)
    entry = manifest.get("minilm", "1.1")
    archive = reconfigured(store / entry["archive"], store / entry["archive"], responseTimeout=RESPONSE_TIMEOUT)
    manifest.record({**entry, "sha256": sha256_file(archive), "size_bytes": archive.stat().st_size})
    env = {**Instance.fresh(home / "serve", store=str(store)).environment(), "SERVE_MODELS": "minilm"}
    with instance(env):
        from serving.torchserve import TorchServe

        yield env, TorchServe()


def test_a_request_past_its_models_limit_is_504_and_not_sent_to_another_worker(impatient):
    env, client = impatient
    url = f"{env['PROXY_ADDRESS']}/predictions/minilm"
    key = {"Authorization": f"Bearer {client.token('inference')}"}
    [first] = ready_pids(client, "minilm", "1.1")
    long_texts = {"texts": [" ".join(["word"] * 300)] * 64}  # 64 x 256 word pieces: within every bound
    started = time.perf_counter()
    response = requests.post(url, json=long_texts, headers=key, timeout=60)
    waited = time.perf_counter() - started
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["error"] == "timeout" and "responseTimeout, 2 s" in body["message"], body
    assert RESPONSE_TIMEOUT - 1 <= waited < RESPONSE_TIMEOUT, waited
    # TorchServe kills the worker when its own responseTimeout expires; a retry would have killed the next one too
    seen = [first]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = ready_pids(client, "minilm", "1.1")
        if pids and pids[0] not in seen:
            seen.append(pids[0])
        if len(seen) == 2 and time.monotonic() > started + 3 * RESPONSE_TIMEOUT + 5:
            break
        time.sleep(0.2)
    assert len(seen) == 2, seen  # one restart
    small = requests.post(url, json={"text": "a cat"}, headers=key, timeout=60)
    assert small.status_code == 200 and len(small.json()["embedding"]) == 384, small.text


def test_keys_are_compared_with_their_case_the_schemes_name_without(served):
    front = served.env["PROXY_ADDRESS"]
    key = served.client.token("inference")
    assert key.swapcase() != key
    for scheme, sent, status in (("Bearer", key, 200), ("bearer", key, 200), ("BEARER", key, 200),
                                 ("Bearer", key.swapcase(), 401), ("Bearer", key.upper(), 401 if key.upper() != key
                                                                   else 200)):
        response = requests.get(f"{front}/ping", headers={"Authorization": f"{scheme} {sent}"}, timeout=30)
        assert response.status_code == status, (scheme, sent, response.text)


# --- registration stays in the model store -------------------------------------------------------------------------


def test_registration_through_the_front_door_takes_archives_of_the_store_only(served, tmp_path):
    door = served.env["PROXY_MANAGEMENT_ADDRESS"]
    key = {"Authorization": f"Bearer {served.client.token('management')}"}
    folder = tmp_path / "digits_9.0"
    folder.mkdir()
    refused = {
        "/models/?url=" + str(folder): 405,  # a trailing slash is /models to TorchServe
        "/models//?url=" + str(folder): 405,
        "/models/digits?url=digits_2.0.mar": 405,
        "/%6dodels?url=" + str(folder): 403,  # nginx decodes the path: this is /models
        "//models?url=" + str(folder): 403,
        "/models?%75rl=" + str(folder): 403,  # an encoded parameter name
        "/models?url=%2Ftmp": 403,  # an encoded value
        "/models?url=digits_2.0.mar&url=" + str(folder): 403,
        "/models?url=digits_2.0.mar&handler=other": 403,
        "/models?url=file://" + str(folder): 403,
        "/models?url=" + str(folder): 403,
        "/models?url=../model_store/digits_2.0.mar": 403,
        "/models?url=digits_2.0/": 403,
        "/models?url=digits_2.0.mar+": 403,
        "/models?url=digits_2.0.mar;x": 403,
        "/models?model_name=x": 403,
    }
    got = {path: requests.post(f"{door}{path}", headers=key, timeout=30).status_code for path in refused}
    assert got == refused
    response = requests.post(f"{door}/models?url=digits_2.0.mar", json={"url": str(folder)}, headers=key, timeout=30)
    assert response.status_code == 403 and response.json()["error"] == "forbidden"
    assert "POST /models" in response.json()["message"]
    # the plain form passes the door: TorchServe itself answers that this version is registered already
    passed = requests.post(f"{door}/models?url=digits_2.0&synchronous=true", headers=key, timeout=60)
    assert passed.status_code == 409 and "already registered" in passed.text, passed.text
    assert not any("digits_9.0" in json.dumps(info) for info in served.client.registered().values())


@pytest.mark.parametrize("name", ["../x", "x`id`", "a/b", "", "-x", "x" * 65, "naïve", "x y"])
def test_the_one_name_rule_refuses_what_a_path_a_url_or_nginx_would_read(name):
    with pytest.raises(ValueError):
        check_model_name(name)
    check_model_name("my_model-2")


@pytest.mark.parametrize("version", ["1.0.", "1..0", "v1", "1.0;x", "1" * 10, "1.2.3.4.5", "", "1.0\n"])
def test_the_one_version_rule(version):
    with pytest.raises(ValueError):
        check_version(version)
    check_version("1.10")
