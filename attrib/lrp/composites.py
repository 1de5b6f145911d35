"""Composites: which rule each layer gets, by dotted name (glob patterns), by position (the first
Linear/Conv layer in ``named_modules()`` order) and by type; named presets in :data:`COMPOSITES`.

    >>> composite = COMPOSITES["epsilon_gamma_box"](low=-2.1, high=2.6)
    >>> LRP(model, composite=composite)

Lookup order for a layer: ``names`` (first matching pattern), then ``first`` (for the first
Linear/Conv), then ``types`` (first matching type), then the defaults: elementwise activations
``Pass``, average pooling ``Norm``, max pooling winner-take-all (``maxpool="average"`` shares like
average pooling, as the LRP tutorial does), BatchNorm taken on its own ``Epsilon(1e-6)``. BatchNorms
right after a Linear/Conv are folded into it (``merge_batchnorm``) and that layer's rule applies to
the folded layer; residual additions of two computed tensors share relevance in proportion to
each branch's contribution (``split_additions``, with ``addition_rule``, ``Norm(1e-6)`` by default;
see :mod:`attrib.lrp.canonizers`). A leaf module called with several tensors from the inputs' graph
(``forward(a, b): return a + b``) needs ``Norm`` by name or type, which shares its output, checked to
be the sum of those inputs, in proportion like an addition; under any other rule it is refused when it runs.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from torch import nn

from ..errors import InputError, InputTypeError
from ..module_types import AVERAGE_POOLS, BATCHNORMS, CONVOLUTIONS, LINEAR_LAYERS, MAX_POOLS
from ..normalization import normalized_range
from .rules import (
    LRP0,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    Blocked,
    ConstantFirst,
    LayerNormRule,
    Norm,
    Pass,
    Rule,
    SoftmaxRule,
    UniformProduct,
    ZBox,
    ZPlus,
)

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink,
    nn.Threshold, nn.LogSigmoid,
)
WINNER_POOLS = MAX_POOLS + (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# leaves whose gradient already moves relevance without changing it (reshapes, eval-mode dropout)
TRANSPARENT = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


TypeRules = Sequence[tuple[Union[type, tuple[type, ...]], Rule]]


@dataclass
class Composite:
    """A mapping from layers to rules. See the module docstring for the lookup order.

    >>> Composite(types=[(nn.Conv2d, Gamma(0.25)), (nn.Linear, Epsilon(1e-6))], first=ZBox(-2.2, 2.7), names={'fc': LRP0()})
    """

    types: TypeRules = ()
    names: dict[str, Rule] = field(default_factory=dict)
    first: Rule | None = None
    maxpool: str = "winner"
    merge_batchnorm: bool = True
    split_additions: bool = True
    addition_rule: Norm = field(default_factory=Norm)
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.addition_rule, Norm):
            raise InputTypeError(f"addition_rule: expected a Norm rule, got {type(self.addition_rule).__name__}")
        if self.maxpool not in ("winner", "average"):
            raise InputError(f"maxpool must be 'winner' or 'average', got {self.maxpool!r}")
        for pattern, rule in self.names.items():
            if not isinstance(rule, Rule):
                raise InputTypeError(f"names[{pattern!r}]: expected a Rule, got {type(rule).__name__}")
        for entry in self.types:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Rule)):
                raise InputTypeError(f"types: expected (type, Rule) pairs, got {entry!r}")

    def _named(self, name: str) -> Rule | None:
        """The rule of the first pattern in ``names`` that matches ``name``."""
        return next((rule for pattern, rule in self.names.items() if fnmatch.fnmatchcase(name, pattern)), None)

    def rule_for(self, name: str, module: nn.Module, first: bool) -> Rule | None:
        """The rule of a leaf module; ``None`` for transparent ones; raises for unknown leaves."""
        named = self._named(name)
        if named is not None:
            return named
        if first and self.first is not None:
            return self.first
        for types, rule in self.types:
            if isinstance(module, types):
                return rule
        if isinstance(module, ACTIVATIONS):
            return Pass()
        if isinstance(module, AVERAGE_POOLS):
            return Norm()
        if isinstance(module, WINNER_POOLS):
            return Norm() if self.maxpool == "average" and isinstance(module, MAX_POOLS) else Gradient()
        if isinstance(module, BATCHNORMS):
            return Epsilon(1e-6)
        if isinstance(module, TRANSPARENT):
            return None
        if isinstance(module, LINEAR_LAYERS):
            raise InputError(
                f"composite {self.name!r}: no rule for layer {name!r} ({type(module).__name__}); "
                "map its type or name to a rule"
            )
        raise InputError(
            f"LRP has no rule for layer {name!r} ({type(module).__name__}); map it in the composite, e.g. "
            f"Composite(names={{{name!r}: Pass()}}) for an elementwise layer"
        )

    def rule_for_function(self, label: str, like: type) -> Rule:
        """The rule of a functional average pooling between modules, looked up as if it were a
        module of type ``like`` named ``label`` (``Norm()`` by default)."""
        named = self._named(label)
        if named is not None:
            return named
        for types, rule in self.types:
            if issubclass(like, types):
                return rule
        return Norm()

    def unused_patterns(self, names: Sequence[str]) -> list[str]:
        return [pattern for pattern in self.names if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]


COMPOSITES: dict[str, Callable[..., Composite]] = {}


def register_composite(name: str):
    """Register a composite factory under ``name`` (the CLI lists :data:`COMPOSITES`)."""
    def decorate(factory: Callable[..., Composite]) -> Callable[..., Composite]:
        @functools.wraps(factory)  # keeps the factory's signature: the CLI asks whether it takes bounds
        def named(*args, **kwargs) -> Composite:
            composite = factory(*args, **kwargs)
            composite.name = name
            return composite
        COMPOSITES[name] = named
        return named
    return decorate


def _bounds(low, high) -> tuple:
    if (low is None) != (high is None):
        raise InputError("low and high: give both or neither")
    if low is None:
        return normalized_range()
    return low, high


@register_composite("epsilon")
def epsilon(epsilon: float = 1e-6) -> Composite:
    """LRP-epsilon on every Linear and Conv layer."""
    return Composite(types=[(LINEAR_LAYERS, Epsilon(epsilon))])


@register_composite("epsilon_plus")
def epsilon_plus(epsilon: float = 1e-6) -> Composite:
    """z+ on convolutions, epsilon on dense layers."""
    return Composite(types=[(CONVOLUTIONS, ZPlus()), (nn.Linear, Epsilon(epsilon))])


@register_composite("epsilon_plus_flat")
def epsilon_plus_flat(epsilon: float = 1e-6) -> Composite:
    """Flat on the first layer, z+ on convolutions, epsilon on dense layers."""
    return Composite(types=[(CONVOLUTIONS, ZPlus()), (nn.Linear, Epsilon(epsilon))], first=Flat())


@register_composite("epsilon_gamma_box")
def epsilon_gamma_box(low=None, high=None, epsilon: float = 1e-6, gamma: float = 0.25) -> Composite:
    """z^B on the first layer (default bounds: [0, 1] pixels after ImageNet normalisation), gamma on
    convolutions, epsilon on dense layers."""
    low, high = _bounds(low, high)
    return Composite(types=[(CONVOLUTIONS, Gamma(gamma)), (nn.Linear, Epsilon(epsilon))], first=ZBox(low, high))


@register_composite("epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(epsilon: float = 1e-6) -> Composite:
    """alpha=2, beta=1 on convolutions, epsilon on dense layers."""
    return Composite(types=[(CONVOLUTIONS, AlphaBeta(2.0, 1.0)), (nn.Linear, Epsilon(epsilon))])


@register_composite("vgg16_tutorial")
def vgg16_tutorial(low=None, high=None, gamma: float = 0.25, epsilon: float = 0.25) -> Composite:
    """The LRP tutorial's torchvision VGG16 recipe: z^B on conv1_1, gamma on conv1_2..conv3_3
    (``features.2``-``features.16``), epsilon = 0.25 * RMS(z) on conv4_1..conv5_3 and the pools
    between them (``features.17``-``features.30``), LRP-0 on the dense layers; max pooling shared like
    average pooling."""
    low, high = _bounds(low, high)
    upper = Epsilon(epsilon, relative=True)
    names: dict[str, Rule] = {"features.0": ZBox(low, high)}
    names.update({f"features.{i}": Gamma(gamma) for i in (2, 5, 7, 10, 12, 14)})
    names.update({f"features.{i}": upper for i in (17, 19, 21, 23, 24, 26, 28, 30)})
    names.update({f"classifier.{i}": LRP0() for i in (0, 3, 6)})
    return Composite(names=names, maxpool="average", types=[])


def _transformer_types(epsilon: float) -> list:
    norms = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return [(CONVOLUTIONS + (nn.Linear,), Epsilon(epsilon)), (norms, LayerNormRule(epsilon))]


def _first_box(low, high) -> ZBox | None:
    """z^B on the first layer when the input's bounds are given (pixels), else nothing (the types' rule)."""
    if (low is None) != (high is None):
        raise InputError("low and high: give both or neither")
    return None if low is None else ZBox(low, high)


@register_composite("attnlrp")
def attnlrp(epsilon: float = 1e-6, low=None, high=None) -> Composite:
    """AttnLRP (Achtibat et al., 2024): LRP-epsilon on Linear and Conv layers, LayerNorm with its
    normalisation as a constant, softmax by its Taylor rule, the two products of attention by the
    uniform rule, GELU/SiLU and other activations by the identity. Attention modules run as
    :func:`attrib.explicit_attention` while LRP runs. ``low``/``high``: the input's bounds (an
    image's normalised pixel range), which put the z^B rule on the first layer (a ViT's ``conv_proj``);
    without them the first layer keeps epsilon (token models start at an embedding)."""
    from ..attention import AttentionContext, AttentionScores

    return Composite(types=[*_transformer_types(epsilon), (nn.Softmax, SoftmaxRule()),
                            ((AttentionScores, AttentionContext), UniformProduct(epsilon))], first=_first_box(low, high))


@register_composite("cp_lrp")
def cp_lrp(epsilon: float = 1e-6, low=None, high=None) -> Composite:
    """CP-LRP (Ali et al., 2022): as ``attnlrp``, but the attention weights are constants: no relevance
    passes through the softmax (to queries and keys), and the weighted sum of the values gives them all
    of its relevance (LRP-epsilon, linear in the values). ``low``/``high``: as for ``attnlrp``."""
    from ..attention import AttentionContext, AttentionScores

    return Composite(types=[*_transformer_types(epsilon), (nn.Softmax, Blocked()), (AttentionContext, ConstantFirst(epsilon)),
                            (AttentionScores, UniformProduct(epsilon))], first=_first_box(low, high))
