"""Models and images for the command line, offline: the embedded digits CNN, torchvision
architectures (weights only from a local file or the local torch cache, never downloaded), a
user factory ``package.module:function``, image files and scikit-image's bundled photos."""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .checks import check_count
from .errors import InputError
from .normalization import IMAGENET_MEAN, IMAGENET_STD, normalized_range

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@dataclass
class Loaded:
    """A model ready to explain and how to feed it.

    >>> loaded = load_model('digits', None)
    >>> loaded.model, loaded.channels, loaded.size, loaded.mean   # the network and how pictures are made for it
    """

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
    output: str | int | None = None  # the element of a dict/tuple output that is explained
    composite: str | None = None  # the LRP composite that fits it, when --composite is not given


def _floats(name: str, values: Any, channels: int) -> tuple[float, ...]:
    """One number per channel, or a one-line error naming the option."""
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"--{name}: expected {channels} numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise InputError(f"--{name}: must be finite numbers, got {list(numbers)}")
    if len(numbers) != channels:
        raise InputError(f"--{name}: expected {channels} numbers (one per channel), got {len(numbers)}")
    return numbers


def _state_dict(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--weights: {path} is a folder, not a weight file")
    if not path.is_file():
        raise InputError(f"--weights: no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle it refuses; the one-line error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code, a truncated file: say so in one line
        raise InputError(f"--weights: {path} is not a plain state dict loadable with weights_only=True ({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"--weights: {path} does not hold a state dict of tensors")
    return state


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def mismatch(model: nn.Module, state: dict) -> str | None:
    """What keeps ``state`` from loading into ``model`` (missing and unexpected keys, shapes), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(missing)} missing keys ({_listed(missing)})" if missing else "",
             f"{len(unexpected)} unexpected keys ({_listed(unexpected)})" if unexpected else "",
             f"{len(shapes)} shape mismatches ({_listed(shapes, 2)})" if shapes else ""]
    found = "; ".join(part for part in parts if part)
    return found or None


def _apply(model: nn.Module, state: dict, source: str) -> None:
    problem = mismatch(model, state)
    if problem is None:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as error:
            problem = str(error).strip().replace("\n", " ")
    raise InputError(f"--weights: {source} does not fit {type(model).__name__}: {problem}; is it the weight file of another "
                     "architecture?")


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


class OutputSelected(nn.Module):
    """``model`` with one element of its dict/tuple/list output as the output. It shares the model's
    submodules, parameters and buffers under the same names (``--layer`` names stay the model's own)
    and leaves the model object itself untouched.

    >>> model = OutputSelected(segmenter, 'out')   # model(x) == segmenter(x)['out']
    """

    inner: nn.Module

    def __init__(self, model: nn.Module, key: str | int) -> None:
        super().__init__()
        self.__dict__["inner"] = model  # not registered: the submodules below are the model's own
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.key = key

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return select_output(self.inner(*args, **kwargs), self.key)


def select_output(output: Any, key: str | int | None) -> Any:
    """``output[key]`` for a dict (by key) or a tuple/list (by index), with a one-line error naming
    what there is; ``output`` itself when ``key`` is None."""
    if key is None:
        return output
    if isinstance(output, dict):
        if key not in output:
            raise InputError(f"--output: {key!r} is not a key of the model's output; it has {list(output)}")
        return output[key]
    if isinstance(output, (tuple, list)):
        try:
            return output[int(key)]
        except (ValueError, IndexError):
            raise InputError(f"--output: {key!r} is not an index of the model's {len(output)}-element output") from None
    raise InputError(f"--output: the model returns a {type(output).__name__}, which has no elements to choose from")


DECLARED = ("channels", "size", "mean", "std", "output")


def _declared(factory: Callable, module: Any, spec: str) -> dict:
    """The input a factory declares: ``factory.attrib_input`` or its module's ``ATTRIB_INPUT``, a dict
    with any of ``channels``, ``size``, ``mean``, ``std``, ``output``."""
    declared = getattr(factory, "attrib_input", None)
    if declared is None:
        declared = getattr(module, "ATTRIB_INPUT", None)
    if declared is None:
        return {}
    if not isinstance(declared, dict) or set(declared) - set(DECLARED):
        raise InputError(f"--model: {spec} declares its input as {declared!r}; give a dict with keys among {', '.join(DECLARED)}")
    return declared


def load_model(spec: str, weights: str | None = None, *, channels: int | None = None, size: int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None, output: str | int | None = None) -> Loaded:
    """``digits``, a torchvision classification model name, or ``package.module:factory``.

    A factory's input defaults to 3 x 224 x 224 with ImageNet's normalisation; the factory may
    declare others (``factory.attrib_input = {"channels": 1, "size": 28, "mean": [0.13], "std": [0.31],
    "output": "logits"}``, or ``ATTRIB_INPUT`` in its module), and the keyword arguments override both.
    ``output`` picks one element of a dict/tuple output (a key or an index).
    """
    options = {k: v for k, v in dict(channels=channels, size=size, mean=mean, std=std, output=output).items() if v is not None}
    if options and ":" not in spec:
        raise InputError(f"--{next(iter(options))}: only a custom model (package.module:factory) takes input options; "
                         f"{spec} has its own")
    if spec == "digits":
        return _digits(weights)
    if spec == "digits-vit":
        return _digits_vit(weights)
    if ":" in spec:
        return _custom(spec, weights, options)
    return _torchvision(spec, weights)


def _digits(weights: str | None) -> Loaded:
    """The embedded digits CNN (or the same architecture with the user's weights)."""
    from .models import DigitsNet, load_digits_model

    return _embedded_digits("digits", load_digits_model, DigitsNet, "embedded (trained on sklearn digits)", weights)


def _digits_vit(weights: str | None) -> Loaded:
    """The embedded tiny ViT on the digits (or the same architecture with the user's weights)."""
    from .models import load_digits_vit, make_digits_vit

    return _embedded_digits("digits-vit", load_digits_vit, make_digits_vit, "embedded (a tiny ViT trained on sklearn digits)",
                            weights, composite="attnlrp")


def _embedded_digits(name: str, load: Callable[[], nn.Module], make: Callable[[], nn.Module], embedded: str,
                     weights: str | None, composite: str | None = None) -> Loaded:
    """A model shipped for the digits: its own weights, or the user's in the same architecture."""
    from .models import pixel_bounds
    from .models.digits import MEAN, SIZE, STD

    if weights in (None, "DEFAULT"):
        model, source = load(), embedded
    else:
        model, source = make(), str(weights)
        _apply(model, _state_dict(weights), source)
    return Loaded(model.eval(), name, 1, SIZE, (MEAN,), (STD,), 10, source, bounds=pixel_bounds(), composite=composite)


def _custom(spec: str, weights: str | None, options: dict[str, Any]) -> Loaded:
    """``package.module:factory``: its input as declared by the factory, overridden by ``options``."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory: Callable = getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise InputError(f"--model: cannot import {spec!r}: {error}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"--model: {spec} returned a {type(model).__name__}, not an nn.Module")
    chosen = {**_declared(factory, module, spec), **options}
    channels = check_count("--channels", chosen.get("channels", 3))
    size = check_count("--input-size", chosen.get("size", 224))
    default_norm = channels == 3 and "mean" not in chosen and "std" not in chosen
    mean = _floats("mean", chosen.get("mean", IMAGENET_MEAN if default_norm else (0.0,) * channels), channels)
    std = _floats("std", chosen.get("std", IMAGENET_STD if default_norm else (1.0,) * channels), channels)
    if not all(s > 0 for s in std):
        raise InputError(f"--std: every value must be > 0, got {list(std)}")
    if weights not in (None, "DEFAULT"):
        _apply(model, _state_dict(weights), weights)
    model.eval()
    key = chosen.get("output")
    shown = OutputSelected(model, key) if key is not None else model
    low, high = normalized_range(mean, std)
    loaded = Loaded(shown, spec, channels, size, mean, std, bounds=(tuple(low.tolist()), tuple(high.tolist())), output=key)
    if weights not in (None, "DEFAULT"):
        loaded.weights = str(weights)
    return loaded


def _torchvision(spec: str, weights: str | None) -> Loaded:
    """A torchvision classifier: random init, the user's state dict, or torchvision's cached file (DEFAULT)."""
    import torchvision

    names = set(torchvision.models.list_models(module=torchvision.models))
    if spec not in names:
        raise InputError(f"--model: unknown model {spec!r}; use digits, digits-vit, text, a torchvision name such as vgg16 or resnet18, "
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
    """One input: ``tensor`` (1, C, H, W) in the model's normalised space, where it came from and
    what was done to it (``record``: the decoding record of :func:`attrib.images.decode` plus the
    resize steps).

    >>> pictures = load_pictures(['cat.png'], loaded)
    >>> pictures[0].tensor.shape, pictures[0].record['steps']   # (1, C, H, W); what was done to the file
    """

    name: str
    tensor: Tensor
    label: int | None = None
    record: dict = field(default_factory=dict)


def _to_tensor(array, loaded: Loaded) -> Tensor:
    """``(H, W, C)`` values in [0, 1] to ``(1, C, H, W)`` in the model's normalised space."""
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    mean = torch.tensor(loaded.mean or (0.0,) * tensor.shape[0], dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.tensor(loaded.std or (1.0,) * tensor.shape[0], dtype=tensor.dtype).view(-1, 1, 1)
    return ((tensor - mean) / std).unsqueeze(0)


def load_pictures(sources: list[str], loaded: Loaded) -> list[Picture]:
    """Image files (any mode pillow opens, decoded faithfully by :mod:`attrib.images`) or the names
    of scikit-image's bundled photos; with no sources, the model's own samples (three held-out
    digits, or the photo of a cat)."""
    from PIL import Image

    from .images import decode, open_image, resize_crop

    if not sources:
        if loaded.name in ("digits", "digits-vit"):
            from .models import preprocess, sample_digits

            images, labels = sample_digits()
            return [Picture(f"digit_{int(labels[i])}", preprocess(images[i:i + 1]), int(labels[i]),
                            {"source": "held-out sample of sklearn's digits", "steps": ["8×8 grey levels 0-16 upscaled to 32×32"]})
                    for i in (3, 5, 8)]
        sources = ["chelsea"]
    if loaded.channels not in (1, 3):
        raise InputError(f"--model: {loaded.channels}-channel inputs cannot be made from image files")
    pictures = []
    for source in sources:
        if source in PHOTOS and not Path(source).exists():
            try:
                import skimage.data
            except ImportError:
                raise InputError(f"image {source!r}: scikit-image is needed for its bundled photos (pip install scikit-image)") from None
            image, origin = Image.fromarray(getattr(skimage.data, source)()), f"scikit-image's photo {source!r}"
        else:
            image, origin = open_image(source), display_name(str(source))
        array, record = decode(image, loaded.channels)
        array, steps = resize_crop(array, loaded.size)
        record = {"source": origin, **record, "steps": record["steps"] + steps}
        pictures.append(Picture(display_name(Path(source).stem), _to_tensor(array, loaded), record=record))
    return pictures


def check_forward(loaded: Loaded, picture: Picture) -> Tensor:
    """The model's output on one picture, or a one-line error when the model rejects its shape,
    changes its input in place, or returns something other than (batch, classes) scores."""
    fed = picture.tensor.clone()
    version = fed._version
    try:
        with torch.no_grad():
            output = loaded.model(fed)
    except SHAPE_ERRORS as error:
        raise InputError(f"image {picture.name!r} of shape {tuple(picture.tensor.shape)} does not fit the model: "
                         f"{first_line(error)}") from None
    if fed._version != version:
        raise InputError("--model: the model changes its input tensor in place (e.g. x += ..., x.relu_()), so the input "
                         "an attribution refers to would not be the one explained; make that operation out of place")
    if isinstance(output, (dict, tuple, list)):
        keys = list(output) if isinstance(output, dict) else list(range(len(output)))
        raise InputError(f"--model: the model returns a {type(output).__name__} ({keys}); choose the scores to explain with "
                         "--output KEY (or declare 'output' in the factory's attrib_input)")
    if not isinstance(output, Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise InputError(f"--model: the output must be (batch, classes) scores, got {shape}")
    if not bool(torch.isfinite(output).all()):
        raise InputError(f"--model: the scores for image {picture.name!r} are not finite (NaN or infinite); check the weights")
    return output


# what a model raises when an input does not fit it (a shape, a dtype, an assertion on the size)
SHAPE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def display_name(stem: str) -> str:
    """A file stem as text that prints and encodes (undecodable bytes shown as U+FFFD)."""
    return stem.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
