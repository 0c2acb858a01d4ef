"""Eager model → TorchScript file.

``export_torchscript`` traces (or scripts, where the model has data-dependent control flow), optionally freezes
(keeping the methods named in ``preserve`` besides ``forward``), and saves. The build then loads the file back as the
server does and checks it against eager (``export/parity.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def export_torchscript(model: torch.nn.Module, example: Any, path: Path, method: str = "trace",
                       freeze: bool = True, preserve: tuple[str, ...] | list[str] = ()) -> Path:
    model = model.eval()
    with torch.no_grad():
        if method == "trace":
            scripted = torch.jit.trace(model, example, check_trace=False)
        elif method == "script":
            scripted = torch.jit.script(model)
        else:
            raise ValueError(f"export method must be trace or script, not {method!r}")
        if freeze:
            scripted = torch.jit.freeze(scripted, preserved_attrs=list(preserve))
    torch.jit.save(scripted, str(path))
    return path
