"""The embedded default model: a small VGG-style CNN trained on scikit-learn's handwritten digits.

``load_digits`` ships 1797 real 8x8 digits (0-16 grey levels). They are scaled to 0-1, upscaled
to 32x32 (bilinear) and normalised with the training set's mean and std. The network has two conv
blocks with max pooling, then dense layers, so every method here (conductance, LRP, Grad-CAM,
DeepLIFT, deconvolution, the ascent, path graphs) applies to it. Weights (float32 state dict,
``digits.pt``) and a few held-out digits (``digits_samples.pt``) ship inside the package and load
with ``torch.load(weights_only=True)``. ``python -m attrib.models.train_digits`` reproduces them.
"""
from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor, nn

from ..errors import InputError

SIZE = 32
# mean and std of the training digits after scaling to 0-1 and upscaling (set by the training script)
MEAN, STD = 0.3052, 0.3235
WEIGHTS, SAMPLES = "digits.pt", "digits_samples.pt"


class DigitsNet(nn.Module):
    """conv(1->16) relu conv(16->16) relu pool | conv(16->32) relu conv(32->32) relu pool | avgpool 4x4 |
    dense 512->64 relu dropout | dense 64->10.

    >>> model = load_digits_model()   # the shipped weights
    >>> model(torch.zeros(1, 1, 8, 8)).shape   # (1, 10)
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def preprocess(digits: Tensor) -> Tensor:
    """Raw digits ``(B, 8, 8)`` or ``(B, 1, 8, 8)`` with grey levels 0-16 -> normalised ``(B, 1, 32, 32)``."""
    digits = torch.as_tensor(digits, dtype=torch.float32)
    if digits.dim() == 3:
        digits = digits.unsqueeze(1)
    if digits.dim() != 4 or digits.shape[1] != 1:
        raise InputError(f"digits: expected (B, 8, 8) or (B, 1, 8, 8), got {tuple(digits.shape)}")
    scaled = F.interpolate(digits / 16.0, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (scaled - MEAN) / STD


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1797 digits (8x8, grey levels 0-16, float32), their labels, and the indices of the
    stratified 75/25 split (``random_state=0``) every shipped digits model was trained and held out on:
    ``(images, labels, train_index, test_index)``. Needs scikit-learn (the ``dev`` extra)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.25, random_state=0, stratify=labels.numpy())
    return images, labels, torch.as_tensor(train), torch.as_tensor(test)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits as the shipped models read them: ``dataset[i]`` is ``(x, label)`` with ``x``
    the normalised ``(1, 32, 32)`` image. ``split``: ``"all"`` (1797, in scikit-learn's order),
    ``"train"`` or ``"test"`` (the stratified 75/25 split of :func:`digits_split`). Needs scikit-learn.

    >>> DigitsDataset("test")[0][0].shape   # torch.Size([1, 32, 32])
    """

    def __init__(self, split: str = "all") -> None:
        if split not in ("all", "train", "test"):
            raise InputError(f"split must be 'all', 'train' or 'test', got {split!r}")
        try:
            images, labels, train, test = digits_split()
        except ImportError:
            raise InputError("the digits dataset needs scikit-learn (pip install scikit-learn)") from None
        index = {"all": torch.arange(len(labels)), "train": train, "test": test}[split]
        self.split = split
        self.images = preprocess(images[index])
        self.labels = labels[index]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def pixel_bounds() -> tuple[float, float]:
    """The normalised values of grey level 0 and 16 (the valid range, for the ascent)."""
    return (0.0 - MEAN) / STD, (1.0 - MEAN) / STD


def _package_file(name: str):
    return resources.files("attrib.models").joinpath(name)


def load_digits_model() -> DigitsNet:
    """The trained model, in eval mode (weights loaded with ``weights_only=True``)."""
    model = DigitsNet()
    with _package_file(WEIGHTS).open("rb") as handle:
        model.load_state_dict(torch.load(handle, weights_only=True))
    return model.eval()


def sample_digits() -> tuple[Tensor, Tensor]:
    """A few held-out digits shipped with the package: raw ``(N, 8, 8)`` grey levels and labels ``(N,)``."""
    with _package_file(SAMPLES).open("rb") as handle:
        data = torch.load(handle, weights_only=True)
    return data["images"], data["labels"]
