"""Eager model → TorchScript file.

``export_torchscript`` traces (or scripts, where the model has data-dependent control flow), optionally freezes, and
saves. The build then loads the file back as the server does and checks it against eager (``export/parity.py``).

Methods besides ``forward`` (``preserve``: the two halves explanations attribute between, ``embed_tokens`` and
``encode_embeddings``) are kept by both methods, and by freezing:

* scripting keeps the methods the model marks ``@torch.jit.export``;
* tracing traces each of them beside ``forward`` (``torch.jit.trace_module``). Their example inputs come from the
  model itself: it defines ``trace_inputs(*example) -> {method: (args, ...)}``, given ``forward``'s example (the
  collated batch), e.g. ``{"embed_tokens": (ids,), "encode_embeddings": (words, mask)}``. A model to trace with
  ``preserve`` but without that hook, or whose hook omits a preserved method, is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from handlers.runtime import as_args, to_tensors

logger = logging.getLogger(__name__)

TRACE_INPUTS = "trace_inputs"  # the model's hook: forward's example → the example inputs of each preserved method
METHODS = ("trace", "script")


def traced_methods(model: torch.nn.Module, example: Any, preserve: tuple[str, ...] | list[str]) -> dict[str, tuple]:
    """{method: example arguments} for ``forward`` and each preserved method, the latter from the model's hook."""
    methods = {"forward": example}  # as torch.jit.trace takes it
    if not preserve:
        return methods
    hook = getattr(model, TRACE_INPUTS, None)
    if not callable(hook):
        raise ValueError(f"cannot trace {', '.join(preserve)} of {type(model).__name__}: it has no "
                         f"{TRACE_INPUTS}(*example) giving their example inputs; add it, or export with method: script")
    given = hook(*as_args(example))
    missing = [name for name in preserve if name not in given]
    if missing:
        raise ValueError(f"{type(model).__name__}.{TRACE_INPUTS} gives no example inputs for {', '.join(missing)}; "
                         "add them to what it returns")
    methods.update({name: as_args(given[name]) for name in preserve})
    return methods


def export_torchscript(model: torch.nn.Module, example: Any, path: Path, method: str = "trace",
                       freeze: bool = True, preserve: tuple[str, ...] | list[str] = ()) -> Path:
    if method not in METHODS:
        raise ValueError(f"export method must be trace or script, not {method!r}")
    model, example = model.eval(), to_tensors(example)
    with torch.no_grad():
        if method == "trace":
            scripted = torch.jit.trace_module(model, traced_methods(model, example, preserve), check_trace=False)
        else:
            scripted = torch.jit.script(model)
        if freeze:
            scripted = torch.jit.freeze(scripted, preserved_attrs=list(preserve))
    lost = [name for name in preserve if not hasattr(scripted, name)]
    if lost:
        raise ValueError(f"the TorchScript export of {type(model).__name__} lost {', '.join(lost)}; "
                         "mark them @torch.jit.export (script) or give them in trace_inputs (trace)")
    torch.jit.save(scripted, str(path))
    logger.info("%s: %s %s%s", Path(path).name, method, type(model).__name__,
                f" keeping {', '.join(preserve)}" if preserve else "")
    return path
