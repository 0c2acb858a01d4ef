"""The A/B operations behind ``make ab``, ``promote``, ``rollback`` and ``routes-reset``: each checks the versions it
routes to are registered with a READY worker, then changes the front door's routing table (``front_door.Proxy``)."""

from __future__ import annotations

from typing import Any

from serving.front_door import Proxy, Routes, describe_split
from serving.instance import ServeError
from serving.torchserve import TorchServe, ready_workers


def _check_ready(ts: TorchServe, model: str, versions: list[str]) -> None:
    registered = {version: info for (m, version), info in ts.registered().items() if m == model}
    if not registered:
        raise ServeError(f"{model} is not registered in TorchServe")
    for version in versions:
        if version not in registered:
            raise ServeError(f"{model} {version} is not registered (registered: {', '.join(sorted(registered))}); "
                             f"make register MODEL={model} VERSION={version} first")
        if ready_workers(registered[version]) < 1:
            raise ServeError(f"{model} {version} has no READY worker; make scale MODEL={model} VERSION={version}")


def _current(routes: Routes, ts: TorchServe, model: str) -> dict[str, Any]:
    """The model's state before a change: its route, or (never routed) all traffic to TorchServe's default."""
    state = routes.state(model)
    if state is None:
        default = ts.default_version(model)
        state = {"split": {default: 100.0}, "default": default}
    return state


def set_split(model: str, split: dict[str, float]) -> str:
    """Route MODEL's traffic by ``split``; TorchServe's default version does not change."""
    ts, proxy = TorchServe(), Proxy()
    _check_ready(ts, model, list(split))
    with proxy.locked() as routes:
        previous = _current(routes, ts, model)
        routes.change(model, split, ts.default_version(model), previous)
        message = proxy.apply(routes)
        routes.save()
    return f"{message}: {model} {describe_split(split)}"


def promote(model: str, version: str) -> str:
    """VERSION becomes TorchServe's default and takes all of the proxy's traffic for MODEL."""
    ts, proxy = TorchServe(), Proxy()
    _check_ready(ts, model, [version])
    with proxy.locked() as routes:
        previous = _current(routes, ts, model)
        ts.set_default(model, version)
        routes.change(model, {version: 100.0}, version, previous)
        message = proxy.apply(routes)
        routes.save()
    return f"{message}: {model} {version} is the default and takes 100% of the traffic"


def rollback(model: str) -> str:
    """Return MODEL to the default and split it had before the last ab or promote."""
    ts, proxy = TorchServe(), Proxy()
    with proxy.locked() as routes:
        target = routes.previous(model)
        _check_ready(ts, model, sorted({*target["split"], target["default"]}))
        ts.set_default(model, target["default"])
        routes.drop_last(model)
        routes.change(model, target["split"], target["default"], previous=None)
        message = proxy.apply(routes)
        routes.save()
    return f"{message}: {model} back to default {target['default']}, {describe_split(target['split'])}"


def share_of(model: str, version: str) -> float:
    """The share of MODEL's traffic that the routing table gives VERSION (0 when MODEL is not routed)."""
    state = Proxy().routes().state(model)
    return 0.0 if state is None else state["split"].get(version, 0.0) / sum(state["split"].values())


def reset() -> str:
    """Drop every split: TorchServe's default of each model takes all of its traffic again."""
    proxy = Proxy()
    with proxy.locked() as routes:
        routes.models = {}
        routes.generation += 1
        message = proxy.apply(routes)
        routes.save()
    return f"{message}: no splits"
