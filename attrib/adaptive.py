"""``n_steps="auto"``: sizing and placing the Stieltjes trapezoid's nodes from the per-step residuals.

Each run of the Stieltjes trapezoid gives, for every step ``k``, layer and example, the completeness residual
``r_k = sum_j (g_k + g_k+1)/2 (y_k+1 - y_k) - (F_k+1 - F_k)`` (:mod:`attrib.sums`). The completeness error is
their sum. Two regimes set how it falls with the number of steps ``N``:

- **kinks** (ReLU / max-pool networks): a step's residual is a sum over the kinks it holds, each
  ``J (t* - midpoint)`` (``J`` the jump of the derivative), with signs that do not repeat. The error is a random
  walk: ``|sum r_k|`` is about ``sigma = sqrt(sum r_k^2)``, and ``sigma`` falls like ``1/N`` (measured on a
  random VGG16 with biases: ``sigma * N`` is constant from 16 to 1024 steps, and ``sigma`` matches ``|delta|``);
- **smooth** paths: every ``r_k`` has the sign of the curvature and ``|sum r_k|`` falls like ``1/N^2``.

The error is read per layer and example as ``|sum r_k|`` with order ``p = 2`` where neighbouring steps'
residuals are correlated (smooth), and as ``sigma`` with ``p = 1`` otherwise. After a uniform pilot run, a run's
size is ``N' = N (safety * error / tolerance) ** (1/p)`` for the worst layer and example. (Fitting ``p`` to two runs instead
was tried: at 16 and 32 steps a random VGG16 is not yet in its asymptotic regime and gave p = 1.9, so the next run
was 2.5x too small.)

**Placement.** With node density ``phi`` (``h(t) = 1 / (N phi(t))``) the random-walk variance is
``integral I(t) h(t)^2 dt`` with ``I`` the variance per unit length (``r_k^2 / h_k^3``); over densities with
``integral phi = 1`` it is smallest for ``phi ~ I^(1/3)`` (Lagrange), where it is ``(integral I^(1/3))^3 / N^2``
against ``integral I / N^2`` for uniform nodes. ``I`` is estimated per step from the last run, smoothed over
neighbouring steps, and floored so that no stretch of the path is left with few nodes on a noisy estimate. The
gain is bounded by that ratio: on the random VGG16 at 64 px it is at most about 10% (the kinks are spread
along the whole path), so the saving there comes from sizing the run instead of searching for ``n_steps``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .quadrature import FIRST_NODE

AUTO = "auto"
PILOT = 16  # the first run: uniform
COHERENT = 0.5  # neighbouring residuals this correlated are a smooth path's: second order
SAFETY = 2.0  # aim at tolerance / SAFETY: |sum r| exceeds 2 sigma about 5% of the time
SMOOTHING = 2  # steps on each side averaged into a step's variance intensity
FLOOR = 0.25  # the density never falls below this share of its mean


def error_measure(residuals: Tensor) -> Tensor:
    """``max(|sum r_k|, sqrt(sum r_k^2))`` per column of ``residuals`` (steps, ...)."""
    r = residuals.double()
    return torch.maximum(r.sum(0).abs(), r.pow(2).sum(0).sqrt())


def next_steps(steps: int, residuals: Tensor, tolerance: float, max_steps: int, safety: float = SAFETY) -> int:
    """The size of the next run, from this run's per-step residuals (steps, columns). Per column: where
    neighbouring steps' residuals agree (lag-1 autocorrelation ``sum r_k r_k+1 / sum r_k^2 >= COHERENT``: a smooth
    path, whose residuals follow its curvature) the error is ``|sum r|`` and falls as ``1/N^2``; otherwise (kinks:
    each step's residual its own) it is a random walk of scale ``sigma = sqrt(sum r^2)``, falling as ``1/N`` (one
    draw, ``|sum r|``, says less about the next run than ``sigma``). ``steps (safety error / tolerance) ** (1/p)``;
    the largest over the columns, at least 1.5x the current run (which missed the tolerance), at most ``max_steps``."""
    r = residuals.double().reshape(residuals.shape[0], -1)
    tiny = torch.finfo(torch.float64).tiny
    lag = (r[1:] * r[:-1]).sum(0) / r.pow(2).sum(0).clamp_min(tiny)
    smooth = lag >= COHERENT
    error = torch.where(smooth, r.sum(0).abs(), r.pow(2).sum(0).sqrt())
    order = torch.where(smooth, 2.0, 1.0).double()
    wanted = float((steps * (safety * error / tolerance).pow(1.0 / order)).max())
    return int(min(max_steps, max(math.ceil(wanted), math.ceil(1.5 * steps), steps + 1)))


def density(alphas: Tensor, residuals: Tensor) -> Tensor:
    """Node density per current step (piecewise constant on the steps; integrates to 1 over [0, 1]):
    ``I^(1/3)`` with ``I`` each column's variance intensity ``r_k^2 / h_k^3`` (smoothed over ``SMOOTHING``
    steps each side), each column normalised to its own total and the columns summed; floored at
    ``FLOOR`` of the mean. ``residuals``: (steps, columns)."""
    h = (alphas[1:] - alphas[:-1]).double()
    r2 = residuals.double().pow(2).reshape(h.shape[0], -1)
    kernel = torch.ones(1, 1, 2 * SMOOTHING + 1, dtype=torch.float64)

    def smooth(v: Tensor) -> Tensor:  # (steps, columns) -> moving sums over neighbouring steps
        return torch.nn.functional.conv1d(v.T.unsqueeze(1), kernel, padding=SMOOTHING).squeeze(1).T

    intensity = smooth(r2) / smooth(h.pow(3).unsqueeze(1).expand_as(r2)).clamp_min(torch.finfo(torch.float64).tiny)
    totals = (intensity * h.unsqueeze(1)).sum(0)
    used = totals > 0
    if not bool(used.any()):
        return torch.ones_like(h)
    shape = (intensity[:, used] / totals[used]).sum(1).pow(1 / 3)
    shape = shape / (shape * h).sum()
    shape = shape.clamp_min(FLOOR)
    return shape / (shape * h).sum()


def place(alphas: Tensor, phi: Tensor, steps: int) -> Tensor:
    """``steps + 1`` nodes at the quantiles ``k / steps`` of the density ``phi`` (piecewise constant on the
    steps of ``alphas``); the first at ``FIRST_NODE``, the last at 1."""
    grid = alphas.double().clone()
    grid[0] = 0.0
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(phi * (grid[1:] - grid[:-1]), 0)])
    mass = mass / mass[-1]
    q = np.linspace(0.0, 1.0, steps + 1)
    nodes = torch.from_numpy(np.interp(q, mass.numpy(), grid.numpy()))
    nodes[0], nodes[-1] = FIRST_NODE, 1.0
    if bool((nodes[1:] <= nodes[:-1]).any()):  # a density so peaked that quantiles collide: fall back to uniform
        nodes = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        nodes[0] = FIRST_NODE
    return nodes
