"""A composite applied to one model: which rule and which view each leaf module gets, decided
before any forward pass (:func:`make_plan`), and the views kept between runs (:class:`ViewCache`).

    >>> views = ViewCache()
    >>> plan = make_plan(model, COMPOSITES["epsilon"](), views)
    >>> plan[id(model.fc)]   # ("fc", Epsilon(...), LinearView, "Epsilon(epsilon=1e-06)")
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import InputError
from ..module_types import BATCHNORMS, LINEAR_LAYERS, MAX_POOLS
from .composites import WINNER_POOLS, Composite
from .rules import Gradient, Rule
from .views import LayerView, MaxAsAveragePoolView, view_of

Entry = tuple[str, Rule, LayerView, str]  # (label, rule, view, repr(rule))


class ViewCache:
    """Views kept by key, rebuilt when a parameter or buffer behind them changed.

    >>> views = ViewCache()
    >>> view = views.get(id(conv), lambda: view_of(conv))   # the same object until conv.weight changes
    """

    def __init__(self) -> None:
        self._views: dict[Any, LayerView] = {}

    def get(self, key: Any, make: Callable[[], LayerView]) -> LayerView:
        view = self._views.get(key)
        if view is None or view.built != view.signature():
            view = make()
            view.built = view.signature()
            self._views[key] = view
        return view

    def clear(self) -> None:
        self._views.clear()

    def __len__(self) -> int:
        return len(self._views)


class Plan(dict):
    """``id(module) -> Entry`` for every leaf module with a rule. ``first``: linear layers' entries
    under the composite's first-layer rule, given to the first linear layer that runs on the input's
    graph; ``refused``: why no rule fits a leaf, raised only if that leaf runs (a module that
    ``forward`` never calls needs no rule); ``labels``: every leaf's label.

    >>> plan = make_plan(model, COMPOSITES['epsilon_plus_flat'](), ViewCache())
    >>> plan.first[id(model.features[0])][1]   # Flat(...): the first layer's rule
    """

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[int, Entry] = {}
        self.refused: dict[int, InputError] = {}
        self.labels: dict[int, str] = {}

    def hooked(self, module: nn.Module) -> bool:
        """Whether the run wraps this module (it has a rule, or a reason why it has none)."""
        key = id(module)
        return key in self or key in self.first or key in self.refused


def make_plan(model: nn.Module, composite: Composite, views: ViewCache) -> Plan:
    """Every leaf of ``model`` under ``composite``; raises if a name pattern matches no leaf."""
    leaves = [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]
    unused = composite.unused_patterns([name for name, _ in leaves])
    if unused:
        raise InputError(f"composite {composite.name!r}: no layer of the model matches {unused}")
    plan = Plan()
    for name, module in leaves:
        plan.labels[id(module)] = name or type(module).__name__
        firsts = (False, True) if isinstance(module, LINEAR_LAYERS) and composite.first is not None else (False,)
        for first in firsts:
            try:
                entry = _entry(composite, views, name, module, first)
            except InputError as error:
                plan.refused.setdefault(id(module), error)
                continue
            if entry is not None:
                (plan.first if first else plan)[id(module)] = entry
    return plan


def _entry(composite: Composite, views: ViewCache, name: str, module: nn.Module, first: bool) -> Entry | None:
    """The rule, view and label of one leaf (``None``: autograd's gradient is its rule)."""
    label = name or type(module).__name__
    rule = composite.rule_for(name, module, first)
    if rule is None or (isinstance(rule, Gradient) and isinstance(module, WINNER_POOLS)):
        return None  # autograd's own gradient is the rule (max pooling: the winner takes all)
    if isinstance(module, BATCHNORMS) and (module.running_mean is None or module.running_var is None):
        raise InputError(f"LRP: BatchNorm {label!r} keeps no running statistics, so it is not an affine map per example")
    if composite.maxpool == "average" and isinstance(module, MAX_POOLS):
        view = views.get(("average", id(module)), lambda: MaxAsAveragePoolView(module))
    else:
        view = views.get(id(module), lambda: view_of(module))
    rule.check(view, label)
    return (label, rule, view, repr(rule))
