"""``import torch`` for TorchServe's worker protocol, where torch is not installed (a serving image whose versions all
run on ONNX Runtime).

TorchServe's worker imports ``ts/protocol/otf_message_handler.py``, which imports torch at its top only to recognise
an answer that is a tensor (``isinstance(answer, torch.Tensor)``); this project's handlers answer bytes
(``handlers/base.py``), so that branch is never taken. Where no torch is installed, that one import gets a placeholder:
its ``Tensor`` is a class nothing is an instance of, and any other attribute raises ModuleNotFoundError. Every other
``import torch`` fails as it would without the placeholder: the finder answers only an import made by that module,
and only after every other finder found no torch.

``deploy/image.py`` installs this module into a torch-free environment's site-packages (as
``toolkit_torch_placeholder``) with a ``.pth`` file that imports it, which Python's ``site`` runs at start-up.
"""

from __future__ import annotations

import sys
import types
from importlib.machinery import ModuleSpec  # already loaded at start-up: importing it costs nothing

PROTOCOL_MODULE = "ts.protocol.otf_message_handler"  # the one module whose `import torch` gets the placeholder
MESSAGE = ("torch is not installed in this environment (its versions run on ONNX Runtime); torch.{name} needs it: "
           "build the image with the torch group (a TorchScript version, or --explanations)")


class TorchPlaceholder(types.ModuleType):
    """What ``import torch`` gives TorchServe's worker protocol module without torch."""

    class Tensor:
        """Nothing is an instance of it: the protocol's tensor branch is never taken."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(MESSAGE.format(name=name), name="torch")


class PlaceholderLoader:
    def create_module(self, spec):
        return TorchPlaceholder(spec.name)

    def exec_module(self, module) -> None:
        pass


class PlaceholderFinder:
    """Last on ``sys.meta_path``: asked only once every real finder found no torch. (Plain classes: importing
    ``importlib.abc`` would cost every Python start-up in the image tens of milliseconds.)"""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch" or not imported_by_protocol():
            return None
        return ModuleSpec("torch", PlaceholderLoader(), origin="placeholder")


def imported_by_protocol() -> bool:
    """Whether TorchServe's worker protocol module is the one importing (its module code is on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == PROTOCOL_MODULE:
            return True
        frame = frame.f_back
    return False


def install() -> None:
    if not any(isinstance(finder, PlaceholderFinder) for finder in sys.meta_path):
        sys.meta_path.append(PlaceholderFinder())


install()
