"""The type aliases of the public signatures, and the one reserved name, in one place."""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

from torch import Tensor, nn

# which scalar of the output is explained (see :mod:`attrib.targets`)
TargetType = Union[None, int, tuple, Sequence[Union[int, tuple]], Tensor, Callable[[Any], Tensor]]
# which units of a layer: an index tuple, a tuple with slices (a filter), or a callable on the layer output
NeuronSelector = Union[int, tuple, Callable[[Tensor], Tensor]]
# a submodule by dotted name or the module itself
LayerSpec = Union[str, nn.Module]
# the path's start: None (zeros), a number, a tensor like the inputs or like one example
Baselines = Union[Tensor, float, int, None, tuple]
# one input tensor, or a tuple of them with one batch size (Captum's convention)
Inputs = Union[Tensor, tuple]

INPUT = "<input>"  # the input as a named place: a key beside layer names in sweeps and traces


def input_keys(count: int) -> tuple[str, ...]:
    """The names of ``count`` inputs as places: ``INPUT`` for one, ``"<input i>"`` for several."""
    return (INPUT,) if count == 1 else tuple(f"<input {i}>" for i in range(count))
