"""The generated Deployment rehearsed on loopback (``deploy/rehearsal.py``): a rehearsal of a cluster, not a cluster.

Three replicas run the container's exact command line and environment from the rendered manifest, from a folder
staged with what the image carries, behind nginx standing in for the Service; the rehearsal plays the kubelet (probes,
preStop, SIGTERM, the grace period) and the endpoints controller.
"""

from __future__ import annotations

import shutil

import pytest
import requests

from deploy.rehearsal import rehearse
from load_test.inputs import digits
from serving.instance import Instance
from tests.conftest import instance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory) -> dict:
    return rehearse("digits", replicas=2, home=tmp_path_factory.mktemp("rehearsal"), split="1.0=20 2.0=80",
                    load_seconds=3.0)


def test_a_rolling_update_under_steady_load_loses_no_request(rehearsed):
    assert rehearsed["failed"] == 0, rehearsed["errors"]
    assert rehearsed["statuses"] == {"200": rehearsed["requests"]}
    # the load ran before, through and after the update: thousands of requests, not a handful
    assert rehearsed["requests_before_update"] > 50
    assert rehearsed["requests"] > 10 * rehearsed["requests_before_update"]


def test_the_pods_apply_the_rendered_split(rehearsed):
    """The split rendered into the ConfigMap (AB_SPLITS) is what every pod's front door serves, from its first
    request: 20 % of the answers from 1.0, 80 % from 2.0."""
    versions = rehearsed["versions"]
    assert set(versions) == {"1.0", "2.0"}, versions
    share = versions["2.0"] / sum(versions.values())
    assert 0.75 < share < 0.85, versions


def test_every_replica_is_replaced_one_at_a_time_and_drains_before_it_stops(rehearsed):
    steps = rehearsed["steps"]
    # one at a time, in order: each deleted replica's replacement is ready before the next is deleted
    assert [(s["deleted"], s["started"]) for s in steps] == [("pod-0", "pod-2"), ("pod-1", "pod-3")]
    assert {s["order"] for s in steps} == {"start, then delete"}  # the Deployment's maxSurge 1, maxUnavailable 0
    for step in steps:
        assert step["pre_stop_exit"] == 0 and step["pre_stop_s"] >= 9, step  # the Deployment's DRAIN_SECONDS
        assert not step["ready_while_draining"] and step["live_while_draining"], step
        assert step["exit_status"] == 0, step  # serve.sh run stopped in order on SIGTERM, inside the grace period


def test_probes_follow_a_crash_and_the_container_exits_for_its_restart(rehearsed):
    crash = rehearsed["crash"]
    assert crash["unready_s"] < 5  # the health checker polls every 0.5 s
    assert crash["exit_status"] not in (0, None)  # serve.sh run exits when TorchServe dies: the kubelet restarts it
    assert crash["ready_again_s"] > crash["exited_s"]


def test_the_kserve_storage_layout_boots_from_its_model_snapshot(tmp_path):
    """What KServe mounts at /mnt/models (config/config.properties with its model_snapshot, model-store/), started as
    the ServingRuntime starts it: TorchServe loads the snapshot, the spec's default version answers, and a client key
    from the Secret's file passes the front door."""
    from deploy.render import render_all

    storage = render_all(tmp_path / "rendered", models=["digits"], use_running=False) / "kserve" / "digits" / "storage"
    mount = tmp_path / "mnt-models"
    shutil.copytree(storage, mount)
    config = mount / "config" / "config.properties"
    config.write_text(config.read_text().replace("/mnt/models", str(mount)))
    keys = tmp_path / "keys"
    keys.write_text("kserve-client-key-0123456789\n")
    env = {**Instance.fresh(tmp_path / "serve", store=str(mount / "model-store")).environment(),
           "TS_CONFIG_FILE": str(config), "SERVE_MODELS": "digits", "CLIENT_KEYS_FILE": str(keys)}
    with instance(env):
        answer = requests.put(f"{env['PROXY_ADDRESS']}/predictions/digits", data=digits()[0],
                              headers={"Authorization": "Bearer kserve-client-key-0123456789"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == "2.0"  # the snapshot's defaultVersion, the spec's default
    # TorchServe extracted the archives itself: nothing was written into KServe's mount
    assert sorted(p.name for p in (mount / "model-store").iterdir()) == ["digits_1.0.mar", "digits_2.0.mar",
                                                                         "manifest.json"]
