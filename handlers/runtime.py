"""The runtimes a model version can be served on, behind one call: ``load_model(path, device, threads, ...)``.

The serialized file names its runtime: ``model.pt`` is TorchScript, ``model.onnx`` is ONNX Runtime. Either way the
loaded model is called with numpy arrays and answers numpy arrays (one, or a tuple), so the handler layers (decode,
collate, forward, answer) run unchanged on both, and on numpy alone: a worker serving an ONNX file never imports
torch (``handlers/worker_site``). Only ``TorchModel`` imports torch, when it is created. Threads per worker come from
the handler's ``threads`` setting for both runtimes (workers x threads <= cores).

``device`` is ``"cpu"`` or ``"cuda:<n>"`` (TorchServe's ``gpu_id``); a runtime without that device falls back to CPU.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: a worker serving an ONNX file never imports torch
    import torch

TORCHSCRIPT_FILE = "model.pt"
ONNX_FILE = "model.onnx"
RUNTIME_FILES = {"torchscript": TORCHSCRIPT_FILE, "onnxruntime": ONNX_FILE}


def runtime_of(path: str | Path) -> str:
    """The runtime a serialized file is for, from its name."""
    suffix = Path(path).suffix
    for runtime, name in RUNTIME_FILES.items():
        if Path(name).suffix == suffix:
            return runtime
    raise ValueError(f"{Path(path).name}: no runtime serves {suffix!r} files; known: {sorted(RUNTIME_FILES.values())}")


def as_args(inputs: Any) -> tuple:
    """A model's input as call arguments: a tuple is spread, anything else is the one argument."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


@functools.cache
def torch_installed() -> bool:
    """Whether torch is installed here, read once from the installed packages' metadata without importing it (a
    serving image without the torch group has none; its worker protocol's stand-in, ``deploy/torch_placeholder.py``,
    is not a package)."""
    from importlib import metadata

    try:
        metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return False
    return True


def load_torchscript(path: str | Path, device: str = "cpu", optimize_for_inference: bool = True):
    """A TorchScript file loaded as a torch module (tensors in and out), as the server runs it.
    ``optimize_for_inference`` (CPU only: it folds and converts convolutions for oneDNN) cannot be saved, so it is
    applied here, at load time, and by the build's parity check."""
    import torch

    try:
        model = torch.jit.load(str(path), map_location=torch_device(device))
    except RuntimeError as error:  # a detector's graph calls torchvision's operators (nms, roi_align)
        if "torchvision::" not in str(error):
            raise
        import torchvision  # noqa: F401 (registers them)

        model = torch.jit.load(str(path), map_location=torch_device(device))
    model = model.eval()
    if optimize_for_inference and torch_device(device).type == "cpu":
        model = torch.jit.optimize_for_inference(model)
    return model


def torch_device(device) -> "torch.device":
    import torch

    device = str(device)
    return torch.device(device if device.startswith("cuda") and torch.cuda.is_available() else "cpu")


class TorchModel:
    """A torch module (TorchScript or eager) called with numpy arrays: each becomes a tensor on the module's device
    (sharing memory on the CPU), the call runs under ``torch.inference_mode``, and every tensor it returns comes
    back as a numpy array. ``module`` is the torch module itself (explanations take its gradients)."""

    def __init__(self, module, device: str = "cpu", threads: int | None = None):
        import torch

        if threads is not None:
            torch.set_num_threads(int(threads))
        self.module = module
        self.device = torch_device(device)

    def __call__(self, *arrays):
        import torch

        tensors = [torch.as_tensor(array).to(self.device) for array in arrays]
        with torch.inference_mode():
            return to_numpy(self.module(*tensors))

    def eval(self) -> "TorchModel":
        return self


def numpy_model(model):
    """A model as the handler layers call it, numpy in and out: a torch module (eager or TorchScript) wrapped in
    ``TorchModel``; anything else (a loaded runtime, a reference evaluator) as it is."""
    return TorchModel(model) if is_torch_module(model) else model


def is_torch_module(model) -> bool:
    """Whether ``model`` is a torch module (eager or TorchScript), without importing torch for anything else."""
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, (torch.nn.Module, torch.jit.ScriptModule))


def to_tensors(inputs: Any) -> Any:
    """Numpy arrays, and tuples and lists of them, as torch tensors (memory shared): what tracing and the ONNX
    export take."""
    import torch

    if isinstance(inputs, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_tensors(x) for x in inputs)
    return inputs


def to_numpy(outputs: Any) -> Any:
    """Tensors, and tuples and lists of them, as numpy arrays (anything else as it is)."""
    if type(outputs).__module__.startswith("torch"):
        return outputs.detach().cpu().numpy()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(to_numpy(x) for x in outputs)
    return outputs


class OnnxModel:
    """An ONNX Runtime session called like the other runtimes: ``model(*arrays)`` → an array, or a tuple of them.

    The graph is optimised when the session is created (``optimization``: ``all``, ``ORT_ENABLE_ALL``, for the CPU it
    runs on): as fast as a graph optimised at build time, in tens of milliseconds, and never tied to the build
    machine's CPU; ``make bench-runtimes`` times every level on every model, and ``all`` led or tied. The CPU memory
    arena is off: with inputs whose shapes vary (texts of any length, images of any size) it keeps every size it was
    ever asked for, and grew a worker to 1.4 GB in a 30-minute soak; without it memory follows the request.
    """

    OPTIMIZATIONS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                     "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}  # graph optimization levels

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 1, optimization: str = "all"):
        import onnxruntime as ort

        device = str(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.OPTIMIZATIONS[optimization])
        options.enable_cpu_mem_arena = False
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *arrays):
        if len(arrays) != len(self.input_names):
            raise TypeError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"not {len(arrays)}")
        feeds = {name: np.ascontiguousarray(to_numpy(array)) for name, array in zip(self.input_names, arrays)}
        outputs = self.session.run(None, feeds)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def eval(self) -> "OnnxModel":
        return self


def load_model(path: str | Path, device: str = "cpu", threads: int = 1, optimize_for_inference: bool = True):
    """The serialized model at ``path`` on the runtime its file name says, ready to call with numpy arrays."""
    if runtime_of(path) == "onnxruntime":
        return OnnxModel(path, device, threads)
    return TorchModel(load_torchscript(path, device, optimize_for_inference), device, threads)
