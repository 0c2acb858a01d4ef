"""The ``digits`` model: a small CNN for scikit-learn's bundled 8x8 handwritten digits, trained at build time.

The 1,797 images (values 0..16) are turned into 8-bit grayscale images once, exactly as a client would send them as
PNG, so training, the held-out accuracy recorded at build time and accuracy measured through the server all see the
same pixels. The held-out split is fixed (seed, stratified, 20 %).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 8x8 images (0..255) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out images (labels from digit_images()): the same on every machine."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, test = train_test_split(indices, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train), np.sort(test)


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The held-out images and their labels: what the recorded accuracy is measured on."""
    images, labels = digit_images()
    _, test = split(labels)
    return images[test], labels[test]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one pooling, two linear layers: about 40 k parameters."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(inputs: torch.Tensor, labels: torch.Tensor, epochs: int, learning_rate: float, batch_size: int = 64,
          seed: int = 0) -> DigitsCNN:
    """Train a fresh DigitsCNN with a fixed seed; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with tqdm(range(epochs), desc="train digits", unit="epoch", leave=False, disable=None) as progress:
        for _ in progress:
            order = torch.randperm(len(labels), generator=generator)
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(inputs[batch]), labels[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            progress.set_postfix(loss=f"{total / len(order):.4f}")
    return model.eval()
