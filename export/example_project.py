"""A user's project, as people arrive with one: ``python -m export.example_project <folder>``.

Writes, offline and in about a minute on 2 cores, what docs/importing.md's worked example imports:

* ``train.py``: the user's own code, with their evaluation transform (``eval_transform``), a training transform
  with random augmentations (``train_transform``) and a model class of their own (``TinyNet``);
* ``val/<class>/<image>``: a held-out set in ImageFolder layout, crops of real photos (a cat, an espresso, a
  rocket) saved as JPEG and in the other modes people send: grayscale, RGBA, palette and CMYK;
* ``resnet18.pth``: a torchvision ResNet-18 trained here for a few steps on other crops, its ``state_dict``.

The tests build on the same project (and save its weights in more shapes).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from export.samples import photo

CLASSES = {"cat": "chelsea", "espresso": "coffee", "rocket": "rocket"}  # class → the photo its crops come from
TRAIN_PER_CLASS, EVAL_PER_CLASS = 12, 6
EVAL_MODES = ("RGB", "L", "RGBA", "P", "CMYK", "RGB")  # served like RGB, whatever the mode
CROP_SIZE = 96
TRAIN_STEPS = 40
SEED = 0

USER_CODE = '''"""The user's training code: what make import reads the preprocessing and the model class from."""
import torchvision.transforms as T
from torch import nn

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)


def eval_transform():
    return T.Compose([T.Resize(72, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


train_transform = T.Compose([T.RandomResizedCrop(64), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


class TinyNet(nn.Module):
    def __init__(self, num_classes, width=16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
'''


@dataclass
class Project:
    root: Path
    code: ModuleType  # the user's train.py, imported
    labels: list[str]  # the class names, sorted
    images: list[Image.Image]  # the training crops
    targets: list[int]
    resnet: torch.nn.Module  # trained, eval mode; its state_dict is resnet18.pth

    @property
    def eval_dir(self) -> Path:
        return self.root / "val"


def crops(name: str, count: int, seed: int) -> list[Image.Image]:
    """Random square crops of a real photo, CROP_SIZE x CROP_SIZE."""
    image = Image.fromarray(photo(name)).convert("RGB")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        side = int(min(image.size) * rng.uniform(0.45, 0.8))
        left, top = rng.integers(0, image.width - side), rng.integers(0, image.height - side)
        out.append(image.crop((left, top, left + side, top + side)).resize((CROP_SIZE, CROP_SIZE), Image.BICUBIC))
    return out


def save(image: Image.Image, path: Path, mode: str) -> None:
    """An image as a file in ``mode``: JPEG for RGB and CMYK, PNG for the others."""
    if mode in ("RGB", "CMYK"):
        image.convert(mode).save(path.with_suffix(".jpg"), quality=92)
    else:
        image.convert(mode).save(path.with_suffix(".png"))


def train(model: torch.nn.Module, images: list[Image.Image], targets: list[int], transform, steps: int) -> None:
    """A few steps of Adam on batches of 16, fixed seed; leaves the model in eval mode."""
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        index = torch.randperm(len(images))[:16]
        batch = torch.stack([transform(images[i]) for i in index])
        loss = torch.nn.functional.cross_entropy(model(batch), torch.tensor([targets[i] for i in index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def user_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"user_code_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_project(root: Path) -> Project:
    import torchvision

    torch.manual_seed(SEED)  # the model's initial weights too: the same project on every run
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(USER_CODE)
    code = user_module(root / "train.py")
    labels = sorted(CLASSES)
    images, targets = [], []
    for index, label in enumerate(labels):
        (root / "val" / label).mkdir(parents=True, exist_ok=True)
        for number, image in enumerate(crops(CLASSES[label], EVAL_PER_CLASS, seed=100 + index)):
            save(image, root / "val" / label / f"{number}", EVAL_MODES[number % len(EVAL_MODES)])
        train_images = crops(CLASSES[label], TRAIN_PER_CLASS, seed=index)
        images += train_images
        targets += [index] * len(train_images)
    resnet = torchvision.models.get_model("resnet18", weights=None, num_classes=len(labels))
    train(resnet, images, targets, code.eval_transform(), steps=TRAIN_STEPS)
    torch.save(resnet.state_dict(), root / "resnet18.pth")
    return Project(root, code, labels, images, targets, resnet)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "example_project")
    write_project(folder)
    print(f"{folder}/: train.py (eval_transform, TinyNet), val/<class>/<image> ({len(CLASSES)} classes x "
          f"{EVAL_PER_CLASS}), resnet18.pth")
