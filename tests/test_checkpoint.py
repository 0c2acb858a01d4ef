"""Bring your own model: checkpoint files as people save them, loaded into architectures named in a spec.

Real architectures (torchvision mobilenet_v3_small trained two steps, so its weights are not the init; timm
mobilenetv3_small_050; users' classes written into folders outside the repo) and real files; a checkpoint passes only
when the rebuilt model's outputs equal the saved model's exactly.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from export.architecture import ArchitectureError, closest, create, infer_args
from export.checkpoint import CheckpointError, head_size, load_weights, read_checkpoint

ARCH = "torchvision:mobilenet_v3_small"
TIMM_ARCH = "timm:mobilenetv3_small_050"
CLASSES = 3
FIT_HINT = "; check that the architecture and its args are the ones it was trained with"
PICKLE_HOW = ("save model.state_dict() instead, or allow it on purpose with ALLOW_PICKLE=1 (make variable) or "
              "unsafe_pickle: true in the spec's source")

USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, n_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    @classmethod
    def build(cls, depth: int, nclasses: int = 10):
        return cls(nclasses, width=8 * depth)


class Needy(nn.Module):
    def __init__(self, depth, num_classes=10, **kwargs):
        super().__init__()
        self.head = nn.Linear(depth, num_classes)


class Broken(nn.Module):
    def __init__(self, num_classes=10):
        raise ValueError("width must be even\\nsecond line")
'''


@dataclass
class Trained:
    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    optimizer: dict
    inputs: torch.Tensor
    outputs: torch.Tensor


def outputs(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(inputs)


def train(model: torch.nn.Module, steps: int = 2) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, CLASSES, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer.state_dict()


@pytest.fixture(scope="module")
def trained() -> Trained:
    torch.manual_seed(0)
    model = create(ARCH, {"num_classes": CLASSES})
    optimizer = train(model)
    inputs = torch.randn(2, 3, 64, 64)
    return Trained(model.eval(), model.state_dict(), optimizer, inputs, outputs(model, inputs))


def rebuilt(checkpoint_state: dict, inputs: torch.Tensor, arch: str = ARCH) -> tuple[torch.Tensor, dict]:
    """A fresh model of ``arch`` sized from the checkpoint, its weights loaded; its outputs and the load report."""
    torch.manual_seed(1)
    model = create(arch, infer_args(arch, head_size(checkpoint_state)))
    report = load_weights(model, checkpoint_state, arch)
    return outputs(model, inputs), report


def error_of(call, *args, **kwargs) -> str:
    """The message of the one-line CheckpointError / ArchitectureError the call raises."""
    with pytest.raises((CheckpointError, ArchitectureError)) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture
def user_code(tmp_path: Path):
    """Folders outside the repo holding a users' ``model.py``; their modules are dropped afterwards."""
    def write(folder: str, source: str = USER_MODEL) -> Path:
        code = tmp_path / folder
        code.mkdir()
        (code / "model.py").write_text(textwrap.dedent(source))
        return code

    yield write
    for name in [name for name, module in sys.modules.items()
                 if str(getattr(module, "__file__", "") or "").startswith(str(tmp_path))]:
        del sys.modules[name]


# --- every shape of checkpoint ---------------------------------------------------------------------------------


def lightning(state: dict, optimizer: dict, prefix: str) -> dict:
    return {"epoch": 4, "global_step": 40, "pytorch-lightning_version": "2.5.0",
            "state_dict": {**{prefix + key: value for key, value in state.items()}, "criterion.weight": torch.ones(3)},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.4)}},
            "optimizer_states": [optimizer], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 0.1, "num_classes": CLASSES}}


# name → (file name, what is saved, expected entry, expected prefix, expected ignored keys)
SHAPES = {
    "raw state_dict": ("raw.pt", lambda t: t.state, None, "", []),
    "state_dict entry": ("weights.pth", lambda t: {"state_dict": t.state, "epoch": 3}, "state_dict", "", []),
    "model entry": ("weights.pth", lambda t: {"model": t.state, "optimizer": t.optimizer}, "model", "", []),
    "model_state_dict entry": ("weights.pt", lambda t: {"model_state_dict": t.state, "epoch": 2, "loss": 0.25,
                                                        "optimizer_state_dict": t.optimizer},
                               "model_state_dict", "", []),
    "DataParallel": ("dp.pt", lambda t: {"state_dict": torch.nn.DataParallel(t.model).state_dict()},
                     "state_dict", "module.", []),
    # what torch.compile(model).state_dict() saves (building the wrapper costs seconds: dynamo's import)
    "torch.compile": ("compiled.pt", lambda t: {f"_orig_mod.{k}": v for k, v in t.state.items()}, None,
                      "_orig_mod.", []),
    "Lightning": ("epoch=4.ckpt", lambda t: lightning(t.state, t.optimizer, "model."), "state_dict", "model.",
                  ["criterion.weight"]),
    "Lightning over DataParallel": ("last.ckpt", lambda t: lightning(t.state, t.optimizer, "model.module."),
                                    "state_dict", "model.module.", ["criterion.weight"]),
    "Hugging Face .bin": ("pytorch_model.bin", lambda t: t.state, None, "", []),
    "safetensors": ("model.safetensors", lambda t: t.state, None, "", []),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_checkpoint_shapes_load_to_identical_outputs(shape, trained, tmp_path):
    file, payload, entry, prefix, ignored = SHAPES[shape]
    path = tmp_path / file
    if path.suffix == ".safetensors":
        save_file(payload(trained), str(path))
    else:
        torch.save(payload(trained), path)
    checkpoint = read_checkpoint(path)
    assert (checkpoint.entry, checkpoint.module) == (entry, None)
    assert checkpoint.entries == ([entry] if entry else [])
    assert head_size(checkpoint.state) == CLASSES
    got, report = rebuilt(checkpoint.state, trained.inputs)
    assert report == {"prefix": prefix, "ignored": ignored, "tensors": len(trained.state)}
    assert torch.equal(got, trained.outputs)


def test_ema_is_preferred_and_entry_picks(trained, tmp_path):
    torch.manual_seed(2)
    ema = create(ARCH, {"num_classes": CLASSES})
    path = tmp_path / "checkpoint-9.pth.tar"
    torch.save({"epoch": 9, "state_dict": trained.state, "optimizer": trained.optimizer,
                "state_dict_ema": ema.state_dict()}, path)

    preferred = read_checkpoint(path)
    assert (preferred.entry, preferred.entries) == ("state_dict_ema", ["state_dict", "state_dict_ema"])
    assert torch.equal(rebuilt(preferred.state, trained.inputs)[0], outputs(ema, trained.inputs))

    plain = read_checkpoint(path, entry="state_dict")
    assert plain.entry == "state_dict"
    assert torch.equal(rebuilt(plain.state, trained.inputs)[0], trained.outputs)

    assert error_of(read_checkpoint, path, entry="model_ema") == (
        f"{path} has no entry 'model_ema' holding weights; it has: state_dict, state_dict_ema; "
        "set entry: to one of them")


def test_entries_that_are_not_weights(trained, tmp_path):
    several, none = tmp_path / "gan.pt", tmp_path / "optimizer.pt"
    torch.save({"generator": trained.state, "discriminator": trained.state, "epoch": 1}, several)
    torch.save({"optimizer": trained.optimizer, "epoch": 1}, none)
    assert error_of(read_checkpoint, several) == (
        f"{several} holds several state dicts (generator, discriminator); choose one with entry: in the spec's source")
    assert read_checkpoint(several, entry="generator").entries == ["generator", "discriminator"]
    assert error_of(read_checkpoint, none) == (
        f"{none} holds no state dict (a dict of tensors); its keys are optimizer, epoch; save model.state_dict()")


def test_timm_checkpoint_round_trip(tmp_path):
    """What timm's train.py saves: args as an argparse.Namespace and a numpy metric beside the weights."""
    torch.manual_seed(3)
    model = create(TIMM_ARCH, infer_args(TIMM_ARCH, 5))
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "arch": "mobilenetv3_small_050", "state_dict": model.state_dict(), "version": 2,
                "args": argparse.Namespace(model="mobilenetv3_small_050", lr=0.1, num_classes=5),
                "metric": np.float64(71.25)}, path)
    inputs = torch.randn(2, 3, 64, 64)
    checkpoint = read_checkpoint(path)
    assert (checkpoint.entry, head_size(checkpoint.state)) == ("state_dict", 5)
    torch.manual_seed(4)
    fresh = create(TIMM_ARCH, infer_args(TIMM_ARCH, 5))
    assert not torch.equal(outputs(fresh, inputs), outputs(model, inputs))
    assert load_weights(fresh, checkpoint.state, TIMM_ARCH)["prefix"] == ""
    assert torch.equal(outputs(fresh, inputs), outputs(model, inputs))


# --- files that are refused ------------------------------------------------------------------------------------


def test_pickled_whole_module_refused_then_allowed(user_code, tmp_path):
    code = user_code("code")
    model = create("model:Net", infer_args("model:Net", 4, code=code), code=code)
    inputs = torch.randn(2, 3, 16, 16)
    whole, wrapped = tmp_path / "whole.pt", tmp_path / "wrapped.pth"
    torch.save(model, whole)
    torch.save({"model": model, "epoch": 1}, wrapped)

    for path in (whole, wrapped):
        assert error_of(read_checkpoint, path) == (
            f"{path} holds a pickled model.Net, not only tensors; unpickling it would run code from the file, so it "
            f"is refused: {PICKLE_HOW}")

    loaded = read_checkpoint(whole, allow_pickle=True, code=code)
    assert (loaded.state, loaded.entry, loaded.entries) == (None, None, [])
    assert type(loaded.module).__name__ == "Net" and torch.equal(outputs(loaded.module, inputs), outputs(model, inputs))
    inside = read_checkpoint(wrapped, allow_pickle=True, code=code)
    assert (inside.entry, inside.entries) == ("model", ["model"])
    assert torch.equal(outputs(inside.module, inputs), outputs(model, inputs))


def test_files_that_are_not_checkpoints(trained, tmp_path):
    text, truncated, bad_safetensors = tmp_path / "notes.pt", tmp_path / "cut.pth", tmp_path / "model.safetensors"
    text.write_text("epoch 3, accuracy 0.91\n")
    torch.save(trained.state, truncated)
    truncated.write_bytes(truncated.read_bytes()[:20000])
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")

    assert error_of(read_checkpoint, text) == (
        f"{text} is not a checkpoint torch can read (it is neither the zip archive torch.save writes nor a pickle); "
        "give the file that torch.save or safetensors wrote, whole")
    assert error_of(read_checkpoint, truncated) == (
        f"{truncated} is not a checkpoint torch can read (its zip archive is truncated or damaged); give the file "
        "that torch.save or safetensors wrote, whole")
    assert error_of(read_checkpoint, bad_safetensors).startswith(f"{bad_safetensors} is not a safetensors file (")
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), scripted)
    assert error_of(read_checkpoint, scripted) == (
        f"{scripted} is a TorchScript archive, not a checkpoint; give the weights it was exported from, saved with "
        "torch.save(model.state_dict(), ...)")
    assert error_of(read_checkpoint, tmp_path / "missing.pt") == (
        f"checkpoint {tmp_path / 'missing.pt'} does not exist; give the path of the file with the weights")


# --- weights that do not fit -----------------------------------------------------------------------------------


def test_missing_unexpected_and_mismatched_keys_are_named(trained):
    model = create(ARCH, {"num_classes": CLASSES})
    no_head = {k: v for k, v in trained.state.items() if not k.startswith("classifier.3.")}
    assert error_of(load_weights, model, no_head, ARCH) == (
        f"the checkpoint does not fit {ARCH}: missing 2 keys (classifier.3.weight, classifier.3.bias){FIT_HINT}")

    no_stem = {k: v for k, v in trained.state.items() if not k.startswith("features.0.")}
    extra = {**no_stem, "extra.weight": torch.zeros(1)}
    assert error_of(load_weights, model, extra, ARCH) == (
        f"the checkpoint does not fit {ARCH}: missing 5 keys (features.0.0.weight, features.0.1.weight, "
        f"features.0.1.bias, ...); unexpected 1 key (extra.weight){FIT_HINT}")

    five = create(ARCH, {"num_classes": 5})
    prefixed = {f"module.{k}": v for k, v in trained.state.items()}
    assert error_of(load_weights, five, prefixed, ARCH) == (
        f"the checkpoint does not fit {ARCH}: shape mismatch in 2 (classifier.3.weight: checkpoint [3, 1024], "
        f"model [5, 1024], classifier.3.bias: checkpoint [3], model [5]) (keys read under the prefix module.)"
        f"{FIT_HINT}")


def test_head_size_of_linear_and_conv_heads():
    assert head_size(create("torchvision:resnet18", {"num_classes": 7}).state_dict()) == 7  # fc.weight [7, 512]
    squeezenet = create("torchvision:squeezenet1_1", {"num_classes": 5}).state_dict()
    assert list(squeezenet["classifier.1.weight"].shape) == [5, 512, 1, 1]
    assert head_size(squeezenet) == 5
    assert error_of(head_size, {"bn.weight": torch.ones(4), "bn.bias": torch.zeros(4)}) == (
        "the checkpoint has no classifier weight (a tensor named *weight with 2 or more dims); "
        "give the number of classes in the spec")


# --- architectures by name -------------------------------------------------------------------------------------


def test_unknown_library_names_give_the_closest():
    assert error_of(infer_args, "torchvision:resnt18", 3) == (
        "unknown architecture torchvision:resnt18; closest: resnet18, resnet152, resnet101, resnet50, resnet34")
    assert error_of(create, "timm:mobilenetv3_smal_050") == (
        "unknown architecture timm:mobilenetv3_smal_050; closest: mobilenetv3_small_050, mobilenetv3_small_100, "
        "mobilenetv3_small_075, tf_mobilenetv3_small_100, tf_mobilenetv3_small_075")
    assert closest("resnet10", ["resnet10t", "vgg11", "resnet101"], n=2) == ["resnet10t", "resnet101"]
    assert error_of(create, "resnet18") == (
        "architecture 'resnet18' is not <where>:<name>; write e.g. torchvision:resnet18, timm:resnet18, "
        "or <module>:<Class> for your own code")
    assert error_of(create, "torchvision:resnet18", {"weights": "DEFAULT"}) == (
        "torchvision:resnet18: args weights would download pretrained weights; remove them from the spec's source "
        "args: (the weights come from the checkpoint)")


def test_user_class_gets_num_classes_inferred(user_code, trained, tmp_path):
    code = user_code("code")
    assert infer_args("model:Net", 4, code=code) == {"n_classes": 4}
    assert infer_args("model:Net", 4, {"width": 4}, code=code) == {"width": 4, "n_classes": 4}
    assert infer_args("model:Net", 4, {"n_classes": 9}, code=code) == {"n_classes": 9}
    assert infer_args("model:Net.build", 4, {"depth": 2}, code=code) == {"depth": 2, "nclasses": 4}
    assert infer_args("model:Needy", 4, {"depth": 2}, code=code) == {"depth": 2, "num_classes": 4}

    torch.manual_seed(5)
    model = create("model:Net.build", {"depth": 2, "nclasses": 4}, code=code)
    path = tmp_path / "user.pt"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, path)
    state = read_checkpoint(path).state
    fresh = create("model:Net", infer_args("model:Net", head_size(state), {"width": 16}, code=code), code=code)
    load_weights(fresh, state, "model:Net")
    inputs = torch.randn(2, 3, 16, 16)
    assert torch.equal(outputs(fresh, inputs), outputs(model, inputs))


def test_user_class_errors_are_named(user_code):
    code = user_code("code")
    assert error_of(infer_args, "model:Needy", 4, code=code) == (
        "model:Needy needs depth, which cannot be inferred from the checkpoint; give them under the spec's source "
        "args:")
    assert error_of(infer_args, "model:Net", 4, {"depht": 2}, code=code) == (
        "model:Net takes no argument depht; it takes n_classes, width; fix the spec's source args:")
    assert error_of(create, "model:Broken", code=code) == (
        "building model:Broken with args {} failed (ValueError: width must be even); fix the spec's source args:")
    assert error_of(create, "nomodule:Net", code=code) == (
        f"no module nomodule in {code.resolve()} or the installed packages; put nomodule.py in the code folder or "
        "fix the module part of the architecture")
    assert error_of(create, "model:Nett", code=code) == (
        f"model ({code.resolve() / 'model.py'}) has no attribute Nett; closest: Net")
    assert error_of(infer_args, "efficientnet_lite_pytorch:EfficientNet.from_name", 4) == (
        "efficientnet_lite_pytorch:EfficientNet.from_name needs model_name, which cannot be inferred from the "
        "checkpoint; give them under the spec's source args:")
    assert error_of(create, "model:Net", code=code.parent / "elsewhere") == (
        f"the code folder {code.parent / 'elsewhere'} does not exist; give the folder that holds model.py")
    assert str(code.resolve()) not in sys.path


def test_two_users_model_py_do_not_collide(user_code):
    first = user_code("first")
    second = user_code("second", USER_MODEL.replace("self.head = nn.Linear(width, n_classes)",
                                                    "self.head = nn.Linear(width, n_classes)\n        self.second = 1"))
    for code, second_one in ((first, False), (second, True), (first, False)):
        model = create("model:Net", {"n_classes": 2}, code=code)
        assert hasattr(model, "second") is second_one
        assert sys.modules["model"].__file__ == str(code.resolve() / "model.py")
