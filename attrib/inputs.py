"""Models and images for the command line, offline: the embedded digits CNN, torchvision
architectures (weights only from a local file or the local torch cache, never downloaded), a
user factory ``package.module:function``, image files and scikit-image's bundled photos."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@dataclass
class Loaded:
    """A model ready to explain and how to feed it."""

    model: nn.Module
    name: str
    channels: int
    size: int
    mean: tuple = ()
    std: tuple = ()
    classes: int | None = None
    weights: str = "random init"
    notes: list[str] = field(default_factory=list)
    bounds: tuple | str | None = "imagenet"


def _state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--weights: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code, a truncated file: say so in one line
        raise InputError(f"--weights: {path} is not a plain state dict loadable with weights_only=True ({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"--weights: {path} does not hold a state dict of tensors")
    return state


def _apply(model: nn.Module, state: dict, source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"--weights: {source} does not fit this model: {first}") from None


def cached_torchvision_weights(name: str) -> Path:
    """Where torch keeps the default weights of a torchvision model (no download is attempted)."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _torchvision_pretrained(spec: str, state: dict, source: str) -> nn.Module:
    """torchvision's own pretrained build (key renames such as DenseNet's, ``transform_input`` for
    GoogLeNet/Inception) fed with ``state``, already loaded with ``weights_only=True``: the builder's
    loader is swapped for one that hands over that dict, so nothing is fetched or unpickled."""
    import torchvision
    from torchvision.models import _api

    original = _api.load_state_dict_from_url
    _api.load_state_dict_from_url = lambda url, *args, **kwargs: dict(state)
    try:
        return torchvision.models.get_model(spec, weights="DEFAULT")
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"--weights: {source} does not fit this model: {first}") from None
    finally:
        _api.load_state_dict_from_url = original


def load_model(spec: str, weights: str | None = None) -> Loaded:
    """``digits``, a torchvision classification model name, or ``package.module:factory``."""
    if spec == "digits":
        from .models import load_digits_model, pixel_bounds
        from .models.digits import MEAN, SIZE, STD, DigitsNet

        if weights in (None, "DEFAULT"):
            model, source = load_digits_model(), "embedded (trained on sklearn digits)"
        else:
            model, source = DigitsNet(), str(weights)
            _apply(model, _state_dict(weights), source)
        return Loaded(model.eval(), "digits", 1, SIZE, (MEAN,), (STD,), 10, source, bounds=pixel_bounds())
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            factory: Callable = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise InputError(f"--model: cannot import {spec!r}: {error}") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise InputError(f"--model: {spec} returned a {type(model).__name__}, not an nn.Module")
        loaded = Loaded(model, spec, 3, 224, IMAGENET_MEAN, IMAGENET_STD)
        if weights not in (None, "DEFAULT"):
            _apply(model, _state_dict(weights), weights)
            loaded.weights = str(weights)
        model.eval()
        return loaded
    import torchvision

    names = set(torchvision.models.list_models(module=torchvision.models))
    if spec not in names:
        raise InputError(f"--model: unknown model {spec!r}; use digits, a torchvision name such as vgg16 or resnet18, "
                         "or package.module:factory")
    if weights == "DEFAULT":
        path = cached_torchvision_weights(spec)
        if not path.is_file():
            raise InputError(f"--weights DEFAULT: {path} is not there; this tool never downloads, so put the file there "
                             "(or pass --weights FILE)")
        model = _torchvision_pretrained(spec, _state_dict(path), str(path))
        loaded = Loaded(model, spec, 3, 224, IMAGENET_MEAN, IMAGENET_STD, 1000, weights=str(path))
        model.eval()
        return loaded
    model = torchvision.models.get_model(spec, weights=None)
    loaded = Loaded(model, spec, 3, 224, IMAGENET_MEAN, IMAGENET_STD, 1000)
    if weights is not None:
        _apply(model, _state_dict(weights), weights)
        loaded.weights = str(weights)
    else:
        loaded.notes.append("random-init weights: the explanations are correct for this network, but it has not learned anything")
    model.eval()
    return loaded


@dataclass
class Picture:
    """One input: ``tensor`` (1, C, H, W) in the model's normalised space and where it came from."""

    name: str
    tensor: Tensor
    label: int | None = None


def _resize_crop(image, size: int):
    from PIL import Image

    width, height = image.size
    scale = size * 256 / 224 / min(width, height) if size >= 64 else size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_tensor(image, loaded: Loaded) -> Tensor:
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    mean = torch.tensor(loaded.mean or (0.0,) * tensor.shape[0]).view(-1, 1, 1)
    std = torch.tensor(loaded.std or (1.0,) * tensor.shape[0]).view(-1, 1, 1)
    return ((tensor - mean) / std).unsqueeze(0)


def load_pictures(sources: list[str], loaded: Loaded) -> list[Picture]:
    """Image files (any format pillow reads) or the names of scikit-image's bundled photos; with no
    sources, the model's own samples (three held-out digits, or the photo of a cat)."""
    from PIL import Image, UnidentifiedImageError

    if not sources:
        if loaded.name == "digits":
            from .models import preprocess, sample_digits

            images, labels = sample_digits()
            return [Picture(f"digit_{int(labels[i])}", preprocess(images[i:i + 1]), int(labels[i])) for i in (3, 5, 8)]
        sources = ["chelsea"]
    pictures = []
    for source in sources:
        if source in PHOTOS and not Path(source).exists():
            try:
                import skimage.data
            except ImportError:
                raise InputError(f"image {source!r}: scikit-image is needed for its bundled photos (pip install scikit-image)") from None
            image = Image.fromarray(getattr(skimage.data, source)())
        else:
            path = Path(source)
            if not path.is_file():
                raise InputError(f"image {source!r}: no such file (or one of the bundled photos: {', '.join(PHOTOS)})")
            try:
                image = Image.open(path)
                image.load()
            except (UnidentifiedImageError, OSError):
                raise InputError(f"image {source!r}: not an image pillow can read") from None
        if loaded.channels == 1:
            image = image.convert("L")
        elif loaded.channels == 3:
            image = image.convert("RGB")
        else:
            raise InputError(f"--model: {loaded.channels}-channel inputs cannot be made from image files")
        pictures.append(Picture(Path(source).stem, _to_tensor(_resize_crop(image, loaded.size), loaded)))
    return pictures


def check_forward(loaded: Loaded, picture: Picture) -> Tensor:
    """The model's output on one picture, or a one-line error when the model rejects its shape."""
    try:
        with torch.no_grad():
            output = loaded.model(picture.tensor)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"image {picture.name!r} of shape {tuple(picture.tensor.shape)} does not fit the model: {first}") from None
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise InputError(f"--model: the output must be (batch, classes) scores, got {type(output).__name__}")
    return output
