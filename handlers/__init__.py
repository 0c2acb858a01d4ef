"""TorchServe handlers: a shared base, task layers, and (only where settings are not enough) per-model classes."""

import importlib
import inspect

# What an image model does → the handler that serves it (``make import TASK=``; ``export/tasks.py`` says what each
# asks of the build).
TASK_HANDLERS = {
    "classification": "image_classifier",
    "multilabel": "multilabel_classifier",
    "detection": "object_detector",
    "segmentation": "image_segmenter",
}
IMAGE_TASKS = tuple(TASK_HANDLERS)


def handler_class(module_name: str) -> type:
    """The one class a module in handlers/ defines, a handler, as TorchServe will find it (it refuses an entry
    module that defines more than one class). TypeError if the module defines anything else."""
    from handlers.base import ModelHandler

    module = importlib.import_module(f"handlers.{module_name}")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if len(classes) != 1 or not issubclass(classes[0], ModelHandler):
        raise TypeError(f"handlers/{module_name}.py must define exactly one class, a handler; found {classes}")
    return classes[0]
