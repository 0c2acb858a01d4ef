"""An architecture named in a spec → an untrained ``torch.nn.Module``, for weights a user brings in a checkpoint.

Three kinds of name, ``<where>:<what>``:
* ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=None, **args)`` (names from
  ``torchvision.models.list_models()``);
* ``timm:<name>``: ``timm.create_model(name, pretrained=False, **args)`` (names from ``timm.list_models()``; a
  pretrained tag such as ``resnet18.a1_in1k`` is accepted and only picks the configuration);
* ``<module>:<attr>[.<attr>]``: the user's own class or factory (a classmethod such as ``EfficientNet.from_name``
  counts), imported from the folder ``code`` or, failing that, from an installed package.

Nothing is ever downloaded: no pretrained weights, no backbone weights; ``args`` asking for them are refused (the
weights come from the checkpoint). ``infer_args`` gives the constructor arguments to record in the spec: the user's
``args`` win, the number of classes goes where the constructor takes it, and a required argument that is missing is
named before anything is built. ``create`` builds the model in eval mode. Every failure is one ArchitectureError
line that says what is wrong and what to do.

The user's folder is on ``sys.path`` only while importing, and a module of the same name imported earlier from
another folder is dropped from ``sys.modules`` first, so two users' folders with a ``model.py`` each do not collide.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

CLASS_PARAMETERS = ("num_classes", "n_classes", "classes", "num_labels", "out_features", "output_size", "nclasses")
LIBRARIES = ("torchvision", "timm")
# arguments that would fetch pretrained weights from the internet; the weights come from the checkpoint instead
DOWNLOAD_ARGUMENTS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")
CLOSE_CUTOFFS = (0.6, 0.3)  # difflib similarity: the usual threshold, then a looser one when nothing passes it


class ArchitectureError(ValueError):
    """The architecture cannot be named, imported or built as the spec asks; the message says what to do."""


def closest(name: str, known: list[str], n: int = 5) -> list[str]:
    """Up to ``n`` names from ``known`` that look most like ``name``, best first."""
    for cutoff in CLOSE_CUTOFFS:
        matches = difflib.get_close_matches(name, known, n=n, cutoff=cutoff)
        if matches:
            return matches
    return []


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _split(arch: str) -> tuple[str, str]:
    where, sep, what = arch.partition(":")
    if not sep or not where or not what:
        hint = f"torchvision:{arch}, timm:{arch}" if arch and ":" not in arch else "torchvision:resnet18"
        raise ArchitectureError(f"architecture {arch!r} is not <where>:<name>; write e.g. {hint}, "
                                "or <module>:<Class> for your own code")
    return where, what


# --- torchvision and timm --------------------------------------------------------------------------------------


def _library_names(library: str) -> list[str]:
    if library == "torchvision":
        import torchvision

        return torchvision.models.list_models()
    import timm

    return timm.list_models()


def _check_library_name(library: str, name: str) -> None:
    if library == "torchvision":
        known = _library_names(library)
        found = name.lower() in known
    else:
        import timm

        known = None
        found = timm.is_model(name)
    if not found:
        known = known if known is not None else _library_names(library)
        near = closest(name.lower(), known)
        tail = ", ".join(near) if near else f"none; see {library} list_models()"
        raise ArchitectureError(f"unknown architecture {library}:{name}; closest: {tail}")


def _refuse_downloads(arch: str, args: dict) -> None:
    asked = [key for key in DOWNLOAD_ARGUMENTS if args.get(key) not in (None, False)]
    if asked:
        raise ArchitectureError(f"{arch}: args {', '.join(asked)} would download pretrained weights; remove them "
                                "from the spec's source args: (the weights come from the checkpoint)")


def _build_library(library: str, name: str, args: dict) -> torch.nn.Module:
    args = {key: value for key, value in args.items() if key not in DOWNLOAD_ARGUMENTS}
    if library == "torchvision":
        import torchvision

        builder = torchvision.models.get_model_builder(name.lower())
        if "weights_backbone" in inspect.signature(builder).parameters:
            args["weights_backbone"] = None  # detection models default to ImageNet backbone weights
        return builder(weights=None, **args)
    import timm

    return timm.create_model(name, pretrained=False, **args)


# --- the user's own code ---------------------------------------------------------------------------------------


def _provides(code: Path, top: str) -> bool:
    return (code / f"{top}.py").is_file() or (code / top).is_dir()


@contextlib.contextmanager
def code_on_path(code: Path | None, modules: Iterable[str] = ()) -> Iterator[None]:
    """``code`` on ``sys.path`` (first) while the block runs. Any of ``modules`` (dotted names) whose top-level
    package the folder provides is dropped from ``sys.modules`` first, with its submodules, so it is imported from
    this folder and not reused from another user's folder of the same name."""
    if code is None:
        yield
        return
    folder = str(Path(code).resolve())
    for top in {module.split(".")[0] for module in modules}:
        if _provides(Path(folder), top):
            for loaded in [key for key in sys.modules if key == top or key.startswith(f"{top}.")]:
                del sys.modules[loaded]
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _where(code: Path | None) -> str:
    return f"in {Path(code).resolve()} or the installed packages" if code is not None else "in the installed packages"


def _import(module_name: str, code: Path | None):
    if code is not None and not Path(code).is_dir():
        raise ArchitectureError(f"the code folder {code} does not exist; give the folder that holds "
                                f"{module_name.split('.')[0]}.py")
    with code_on_path(code, [module_name]):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(f"{error.name}.")):
                raise ArchitectureError(f"no module {module_name} {_where(code)}; put {module_name}.py in the "
                                        "code folder or fix the module part of the architecture") from None
            raise ArchitectureError(f"importing {module_name} failed: it imports {error.name}, which is not "
                                    "installed; install it or add it to the code folder") from None
        except Exception as error:  # a user's module can fail to import in any way; report it as one line
            raise ArchitectureError(f"importing {module_name} failed ({_first_line(error)}); fix the module "
                                    "and build again") from None


def _user_callable(module_name: str, attrs: str, code: Path | None) -> Callable:
    target = _import(module_name, code)
    for depth, attr in enumerate(attrs.split(".")):
        if not hasattr(target, attr):
            owner = ".".join([module_name, *attrs.split(".")[:depth]])
            names = [n for n in dir(target) if not n.startswith("_")]
            near = closest(attr, names)
            hint = f"closest: {', '.join(near)}" if near else f"it has: {', '.join(names[:10]) or 'nothing public'}"
            where = getattr(target, "__file__", None) or _where(code)
            raise ArchitectureError(f"{owner} ({where}) has no attribute {attr}; {hint}")
        target = getattr(target, attr)
    if not callable(target):
        raise ArchitectureError(f"{module_name}:{attrs} is a {type(target).__name__}, not a class or factory; "
                                "name the class or the function that builds the model")
    return target


def _signature(target: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins and some C extensions have none; nothing can be inferred then
        return None


def _user_args(arch: str, target: Callable, num_classes: int | None, args: dict) -> dict:
    signature = _signature(target)
    if signature is None:
        return dict(args)
    params = signature.parameters
    by_name = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [key for key in args if key not in {p.name for p in by_name}]
    if unknown and not takes_kwargs:
        raise ArchitectureError(f"{arch} takes no argument {', '.join(unknown)}; it takes "
                                f"{', '.join(p.name for p in by_name) or 'none'}; fix the spec's source args:")
    result = dict(args)
    names = {p.name for p in by_name}
    if num_classes is not None and not any(name in result for name in CLASS_PARAMETERS):
        slot = next((name for name in CLASS_PARAMETERS if name in names), None)
        if slot is not None:
            result[slot] = num_classes
    required = [p.name for p in params.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in result]
    if required:
        raise ArchitectureError(f"{arch} needs {', '.join(required)}, which cannot be inferred from the "
                                "checkpoint; give them under the spec's source args:")
    return result


# --- public calls ----------------------------------------------------------------------------------------------


def infer_args(arch: str, num_classes: int | None, args: dict | None = None, code: Path | None = None) -> dict:
    """The constructor arguments to record in the spec: ``args`` as given, plus the number of classes where the
    constructor takes it (``num_classes`` for torchvision and timm; for a user callable, the first name of
    CLASS_PARAMETERS its signature has). A required argument that is neither given nor inferable is an error."""
    args = dict(args or {})
    where, what = _split(arch)
    _refuse_downloads(arch, args)
    if where in LIBRARIES:
        _check_library_name(where, what)
        return {"num_classes": num_classes, **args} if num_classes is not None else args
    return _user_args(arch, _user_callable(where, what, code), num_classes, args)


def create(arch: str, args: dict | None = None, code: Path | None = None) -> torch.nn.Module:
    """The untrained model ``arch`` built with ``args``, in eval mode."""
    args = dict(args or {})
    where, what = _split(arch)
    _refuse_downloads(arch, args)
    if where in LIBRARIES:
        _check_library_name(where, what)
        target = None
    else:
        target = _user_callable(where, what, code)
    try:
        model = _build_library(where, what, args) if target is None else target(**args)
    except Exception as error:  # a constructor can raise anything; the user needs its message, not a traceback
        raise ArchitectureError(f"building {arch} with args {args} failed ({_first_line(error)}); fix the "
                                "spec's source args:") from None
    if not isinstance(model, torch.nn.Module):
        raise ArchitectureError(f"{arch} returned a {type(model).__name__}, not a torch.nn.Module; name the class "
                                "or the factory that returns the model")
    logger.info("built %s with args %s", arch, args)
    return model.eval()
