"""Start-up hook of the Python processes TorchServe starts: serve.sh puts this folder first on their PYTHONPATH,
and Python imports ``sitecustomize`` from it before anything else.

TorchServe's worker module imports torch at its top (``ts/protocol/otf_message_handler.py``), only to recognise an
answer that is a tensor; this project's handlers answer bytes (``handlers/base.py``), so that branch is never taken.
Here torch is registered as a stand-in module that imports the real one on the first use of any of its attributes:
``import torch`` costs nothing until then. A TorchScript worker uses it when its model loads and pays the import
then; an ONNX Runtime worker never does (its explanations would), which saves about 320 MB and a few seconds of CPU
per worker. (``importlib.util.LazyLoader`` cannot do this here: the import statement reads ``__spec__`` of a module
already in ``sys.modules``, and any attribute read loads a LazyLoader module.)

``WORKER_TORCH=eager`` in TorchServe's environment imports torch eagerly again, as TorchServe does on its own: the
benchmark compares the two.
"""

import importlib
import importlib.util
import os
import sys
import types


class Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used: then the real module is imported (it replaces
    this one in ``sys.modules``) and the attribute comes from it, as every later one does."""

    def __getattr__(self, attribute: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attribute)


def defer_import(name: str) -> None:
    """Put a stand-in for module ``name`` in ``sys.modules``, if the module is installed."""
    spec = importlib.util.find_spec(name)
    if spec is not None:
        module = Deferred(name)
        module.__spec__ = spec
        sys.modules[name] = module


if os.environ.get("WORKER_TORCH", "lazy") != "eager" and "torch" not in sys.modules:
    defer_import("torch")
