"""Integration nodes and weights on the straight path x' + alpha (x - x').

Captum's five methods use Captum's definitions exactly (riemann nodes from ``torch.linspace`` in
float32, step sizes rounded to float32, Gauss-Legendre from numpy), so numbers agree:

- ``weighted_rule`` (integrated gradients, internal influence, neuron conductance):
  ``sum_k w_k h(alpha_k)`` over ``n_steps`` nodes. Note Captum's ``riemann_trapezoid`` weights sum to
  ``1 - 1/n`` over nodes spaced ``1/(n-1)``, and ``riemann_left/right/middle`` nodes never reach 0 or 1.
- ``stieltjes_rule`` (layer conductance): Captum's left Riemann-Stieltjes sum
  ``sum_k g(alpha_k) (y(alpha_{k+1}) - y(alpha_k))`` over the method's ``n_steps + 1`` nodes.

``"stieltjes_trapezoid"`` is ours: nodes ``0, 1/n, ..., 1`` and the gradient averaged over both ends
of each step, ``sum_k (g_k + g_{k+1})/2 (y_{k+1} - y_k)``; as a weighted rule it is the ordinary
trapezoid rule (weights ``1/n``, halved at the ends). Error O(1/n^2) on smooth paths, O(1/n) per kink
crossed but with half the left sum's mean constant, and exact when the gradient is constant along the
path (a bias-free ReLU / max-pool network with a zero baseline: positively homogeneous, so every
activation scales with alpha). The node at 0 is evaluated at ``alpha = 2**-60`` instead: a ReLU
exactly at 0 (every unit at a zero baseline of a bias-free net) has no derivative there and torch
reports 0; the one-sided derivative from inside the path is the one the first step needs. The
inputs, activations and scores there differ from those at ``alpha = 0`` by ``2**-60`` relative
(below float64 resolution).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .checks import check_count
from .errors import InputError

CAPTUM_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
STIELTJES = "stieltjes_trapezoid"
QUADRATURE_METHODS = CAPTUM_METHODS + (STIELTJES,)
FIRST_NODE = 2.0 ** -60


def check_method(method: str) -> str:
    if method not in QUADRATURE_METHODS:
        raise InputError(f"method: {method!r} is not one of {', '.join(QUADRATURE_METHODS)}")
    return method


def check_n_steps(n_steps: int, minimum: int = 1) -> int:
    return check_count("n_steps", n_steps, minimum)


def captum_alphas(method: str, n: int) -> list[float]:
    """Captum's nodes for ``n`` evaluations (riemann: float32 linspace; Gauss-Legendre: numpy)."""
    if method == "gausslegendre":
        return (0.5 * (1 + np.polynomial.legendre.leggauss(n)[0])).tolist()
    start, stop = {
        "riemann_trapezoid": (0.0, 1.0),
        "riemann_left": (0.0, 1 - 1 / n),
        "riemann_right": (1 / n, 1.0),
        "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
    }[method]
    return torch.linspace(start, stop, n, dtype=torch.float32).tolist()


def captum_step_sizes(method: str, n: int) -> list[float]:
    """Captum's weights for ``n`` evaluations, rounded to float32 as Captum applies them."""
    if method == "gausslegendre":
        sizes = (0.5 * np.polynomial.legendre.leggauss(n)[1]).tolist()
    else:
        sizes = [1 / n] * n
        if method == "riemann_trapezoid":
            sizes[0] /= 2
            sizes[-1] /= 2
    return torch.tensor(sizes, dtype=torch.float32).tolist()


def uniform_nodes(n_steps: int) -> list[float]:
    """Nodes of ``stieltjes_trapezoid``: ``k/n`` for k = 0..n, the first one moved to ``2**-60``."""
    return [FIRST_NODE] + [k / n_steps for k in range(1, n_steps + 1)]


def weighted_rule(method: str, n_steps: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights (float64) for ``sum_k w_k h(alpha_k)``."""
    check_method(method)
    if method == STIELTJES:
        check_n_steps(n_steps)
        weights = [1 / n_steps] * (n_steps + 1)
        weights[0] /= 2
        weights[-1] /= 2
        return torch.tensor(uniform_nodes(n_steps), dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    check_n_steps(n_steps, minimum=1 if method == "gausslegendre" else 2)
    return (
        torch.tensor(captum_alphas(method, n_steps), dtype=torch.float64),
        torch.tensor(captum_step_sizes(method, n_steps), dtype=torch.float64),
    )


def stieltjes_rule(method: str, n_steps: int) -> tuple[Tensor, str]:
    """Nodes (float64, ``n_steps + 1`` of them) and the form, ``"left"`` (Captum) or ``"trapezoid"``."""
    check_method(method)
    check_n_steps(n_steps)
    if method == STIELTJES:
        return torch.tensor(uniform_nodes(n_steps), dtype=torch.float64), "trapezoid"
    return torch.tensor(captum_alphas(method, n_steps + 1), dtype=torch.float64), "left"

