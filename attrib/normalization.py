"""Input normalisation ``(x - mean) / std``: ImageNet's constants and the range it maps [0, 1] to."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalized_range(mean: Sequence[float] | Tensor = IMAGENET_MEAN, std: Sequence[float] | Tensor = IMAGENET_STD) -> tuple[Tensor, Tensor]:
    """Per channel, in float64: where 0 and 1 land, ``low = -mean / std`` and ``high = (1 - mean) / std``.

    >>> normalized_range()[0]   # tensor([-2.1179, -2.0357, -1.8044], dtype=torch.float64)
    """
    mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
    return -mean / std, (1 - mean) / std
