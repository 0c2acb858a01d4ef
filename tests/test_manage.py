"""The management command line against a real TorchServe: register (sha256-checked), unregister, scale, tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from archives.store import Manifest
from serving.instance import free_ports
from serving.torchserve import ready_workers as ready
from tests.conftest import manage, one_line_error

pytestmark = pytest.mark.integration


def ready_workers(served, model: str, version: str) -> int | None:
    info = served.client.registered().get((model, version))
    return None if info is None else ready(info)


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(Manifest().store, copy)
    return copy


def test_register_refuses_unknown_unbuilt_and_altered_archives(served, store_copy):
    assert "unknown model 'nosuch'" in one_line_error(manage("register", "nosuch", "1.0"))
    assert "unknown version digits 9.9" in one_line_error(manage("register", "digits", "9.9"))

    manifest = json.loads((store_copy / "manifest.json").read_text())
    del manifest["models"]["digits"]["1.0"]
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    error = one_line_error(manage("register", "digits", "1.0", MODEL_STORE=str(store_copy)))
    assert "digits 1.0 is not built" in error

    with open(store_copy / "digits_2.0.mar", "ab") as archive:
        archive.write(b"altered")
    error = one_line_error(manage("register", "digits", "2.0", MODEL_STORE=str(store_copy)))
    assert "refused" in error and "digits_2.0.mar was altered" in error


def test_unregister_then_register_a_version(served, photos):
    assert served.client.default_version("digits") == "2.0"
    assert manage("unregister", "digits", "1.0").returncode == 0
    try:
        assert ready_workers(served, "digits", "1.0") is None
        assert served.client.predict("digits", photos["coffee"], "1.0").status_code == 404
        assert "already" not in one_line_error(manage("unregister", "digits", "1.0"))
    finally:
        registered = manage("register", "digits", "1.0")
    assert registered.returncode == 0, registered.stderr
    assert ready_workers(served, "digits", "1.0") == 1  # the archive's model-config minWorkers
    assert served.client.predict("digits", photos["coffee"], "1.0").status_code == 200
    assert served.client.default_version("digits") == "2.0"  # a registered version does not become the default
    assert "already registered" in one_line_error(manage("register", "digits", "1.0"))


def test_scale_a_version_up_and_back(served):
    try:
        assert manage("scale", "digits", "2.0", "--min", "2", "--max", "2").returncode == 0
        assert ready_workers(served, "digits", "2.0") == 2
    finally:
        assert manage("scale", "digits", "2.0", "--min", "1", "--max", "1").returncode == 0
    assert ready_workers(served, "digits", "2.0") == 1
    assert "--min <= --max" in one_line_error(manage("scale", "digits", "2.0", "--min", "3", "--max", "1"))


@pytest.mark.parametrize("spoil", ["expired", "invalid"])
def test_commands_keep_working_when_the_token_expires_or_is_refused(served, photos, spoil, tmp_path):
    key_file = Path(served.env["SERVE_HOME"]) / "key_file.json"
    keys = json.loads(key_file.read_text())
    old = keys["inference"]["key"]
    if spoil == "expired":
        keys["inference"]["expiration time"] = "2000-01-01T00:00:00.000000000Z"
    else:
        keys["inference"]["key"] = "not-a-key"
    key_file.write_text(json.dumps(keys))
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(photos["coffee"])
    result = manage("predict", "efficientnet_lite0", str(photo))
    assert result.returncode == 0 and "espresso" in result.stdout, result.stderr
    assert json.loads(key_file.read_text())["inference"]["key"] not in (old, "not-a-key")  # renewed


def test_a_stopped_server_is_one_line(served):
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    for args in (["list"], ["register", "digits", "1.0"], ["set-default", "digits", "2.0"]):
        error = one_line_error(manage(*args, TS_MANAGEMENT_ADDRESS=closed))
        assert f"TorchServe is not answering at {closed}" in error
