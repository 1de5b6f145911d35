"""The embedded tiny Vision Transformer: torchvision's own ``VisionTransformer`` trained on the digits.

The same data, split and preprocessing as the digits CNN (``attrib.models.digits``): scikit-learn's
8x8 digits scaled to 0-1, upscaled to 32x32 and normalised with ``MEAN``/``STD``, so the same held-out
digits (``sample_digits``) and baselines apply to both models. The network is an instance of
``torchvision.models.VisionTransformer`` (the class behind ``vit_b_16``) with image_size 32, patch 4
(an 8x8 grid of 64 patches plus the class token), 4 encoder blocks of 4 heads, hidden size 64, MLP
size 128, no dropout and 10 classes. One change after construction: torchvision's patch embedding
``conv_proj`` reads 3 channels and the digits are grey, so it is replaced by a 1-channel
``nn.Conv2d(1, 64, 4, stride=4)`` under the same name (initialised as torchvision initialises its own).
Every other module keeps torchvision's name and code: ``conv_proj``, ``encoder.pos_embedding`` (a
parameter), ``encoder.layers.encoder_layer_0.ln_1`` / ``.self_attention`` / ``.ln_2`` / ``.mlp``,
``encoder.ln`` and ``heads.head``. (``self_attention.out_proj`` is a Linear whose weights
``nn.MultiheadAttention`` applies itself: its forward hooks never fire.)

Weights (float32 state dict, ``digits_vit.pt``) load with ``torch.load(weights_only=True)``;
``python -m attrib.models.train_digits_vit`` reproduces them bit for bit on CPU and writes the
held-out accuracy to ``digits_vit_training.json``. torchvision is imported when a model is built,
not when ``attrib.models`` is.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .digits import SIZE

if TYPE_CHECKING:
    from torchvision.models import VisionTransformer

PATCH = 4
LAYERS, HEADS, HIDDEN, MLP = 4, 4, 64, 128
CLASSES = 10
WEIGHTS, RECORD = "digits_vit.pt", "digits_vit_training.json"


def make_digits_vit() -> VisionTransformer:
    """An untrained ``torchvision.models.VisionTransformer`` for ``(B, 1, 32, 32)`` digits (see the module doc).

    Draws from torch's global generator (torchvision's initialisation, then the grey ``conv_proj``'s).
    """
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN,
                              mlp_dim=MLP, dropout=0.0, attention_dropout=0.0, num_classes=CLASSES)
    # one grey channel instead of RGB; same kernel, stride, name and initialisation as torchvision's
    proj = nn.Conv2d(1, HIDDEN, kernel_size=PATCH, stride=PATCH)
    nn.init.trunc_normal_(proj.weight, std=(1.0 / (PATCH * PATCH)) ** 0.5)
    assert proj.bias is not None
    nn.init.zeros_(proj.bias)
    model.conv_proj = proj
    return model


def load_digits_vit() -> VisionTransformer:
    """The trained tiny ViT, in eval mode (weights loaded with ``weights_only=True``).

    Inputs are ``attrib.models.preprocess(digits)``: ``(B, 1, 32, 32)``, as for the digits CNN.

    >>> model = load_digits_vit()
    >>> model(preprocess(sample_digits()[0])).argmax(1)   # the ten held-out sample digits
    """
    model = make_digits_vit()
    with resources.files("attrib.models").joinpath(WEIGHTS).open("rb") as handle:
        model.load_state_dict(torch.load(handle, weights_only=True))
    return model.eval()


def digits_vit_record() -> dict[str, Any]:
    """What the training script measured: held-out accuracy, epochs, seconds, threads, parameters, versions."""
    record: dict[str, Any] = json.loads(resources.files("attrib.models").joinpath(RECORD).read_text(encoding="utf-8"))
    return record
