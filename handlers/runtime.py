"""The runtimes a model version can be served on, behind one call: ``load_model(path, device, threads, ...)``.

The serialized file names its runtime: ``model.pt`` is TorchScript, ``model.onnx`` is ONNX Runtime. Either way the
loaded model is called like a torch module, tensors in and tensors out, so the handler layers (decode, collate,
forward, answer) run unchanged on both. Threads per worker come from the handler's ``threads`` setting for both
runtimes (workers x threads <= cores).
"""

from __future__ import annotations

from pathlib import Path

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


def load_torchscript(path: str | Path, device: torch.device, optimize_for_inference: bool) -> torch.jit.ScriptModule:
    """Load an exported model as the server runs it. ``optimize_for_inference`` (CPU only: it folds and converts
    convolutions for oneDNN) cannot be saved, so it is applied here, at load time, and by the build's parity check."""
    model = torch.jit.load(str(path), map_location=device).eval()
    if optimize_for_inference and device.type == "cpu":
        model = torch.jit.optimize_for_inference(model)
    return model


class OnnxModel:
    """An ONNX Runtime session called like a torch module: ``model(*tensors)`` → a tensor, or a tuple of them.

    The graph is optimised when the session is created (``ORT_ENABLE_ALL``, for the CPU it runs on): as fast as a
    graph optimised at build time, in tens of milliseconds, and never tied to the build machine's CPU.
    """

    def __init__(self, path: str | Path, device: torch.device, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.device = device

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"not {len(inputs)}")
        feeds = {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(array).to(self.device) for array in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def eval(self) -> "OnnxModel":
        return self


def load_model(path: str | Path, device: torch.device, threads: int, optimize_for_inference: bool = True):
    """The serialized model at ``path`` on the runtime its file name says, ready to call."""
    if runtime_of(path) == "onnxruntime":
        return OnnxModel(path, device, threads)
    return load_torchscript(path, device, optimize_for_inference)
