"""Layer-wise relevance propagation: rules, composites, canonizers, plan, run and method."""
from .composites import COMPOSITES, Composite, register_composite
from .method import LRP
from .report import ConservationReport, LayerBalance
from .rules import (
    LRP0,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    Norm,
    Pass,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
)

__all__ = [
    "COMPOSITES", "AlphaBeta", "Composite", "ConservationReport", "Epsilon", "Flat", "Gamma", "Gradient", "LRP",
    "LRP0", "LayerBalance", "Norm", "Pass", "Rule", "WSquare", "ZBox", "ZPlus", "register_composite",
]
