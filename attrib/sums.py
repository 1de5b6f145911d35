"""Streaming path sums over step-major chunks, with memory independent of the number of steps."""
from __future__ import annotations

import torch
from torch import Tensor

from .engine import Chunk


def _per_row(weights: Tensor, like: Tensor) -> Tensor:
    return weights.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


class WeightedSum:
    """``sum_k w_k h(alpha_k)`` per example, where ``h`` is a gradient (integrated gradients' form)."""

    def __init__(self, weights: Tensor, n_examples: int) -> None:
        self.weights = weights
        self.n_examples = n_examples
        self.total: dict[str, Tensor] = {}

    def add(self, chunk: Chunk, grads: dict[str, Tensor] | None = None) -> None:
        for name, grad in (grads if grads is not None else chunk.grads).items():
            if name not in self.total:
                self.total[name] = grad.new_zeros((self.n_examples,) + grad.shape[1:])
            weights = self.weights.to(grad.device)[chunk.node]
            self.total[name].index_add_(0, chunk.example, grad * _per_row(weights, grad))


def step_terms(form: str, g_start: Tensor, g_end: Tensor, y_start: Tensor, y_end: Tensor) -> Tensor:
    """One step of the Riemann-Stieltjes sum: ``g_start dy`` (left) or ``(g_start + g_end)/2 dy``."""
    gradient = g_start if form == "left" else 0.5 * (g_start + g_end)
    return gradient * (y_end - y_start)


class StieltjesSum:
    """``sum_k G_k (y_{k+1} - y_k)`` per example and layer, streamed over chunks.

    Row ``r``'s predecessor on the path is row ``r - B``; the last B rows of a chunk are carried to
    the next, so chunks need not overlap and the result does not depend on the chunk size. Each
    step's sum and score change are kept, (n_steps, B), for the completeness residual per step.
    """

    def __init__(self, form: str, n_nodes: int, n_examples: int) -> None:
        self.form = form
        self.n_examples = n_examples
        self.n_steps = n_nodes - 1
        self.total: dict[str, Tensor] = {}
        self.step_sums: dict[str, Tensor] = {}
        self.step_score_change: Tensor | None = None
        self._carry: dict[str, tuple[Tensor, Tensor]] = {}
        self._carry_scores: Tensor | None = None

    def add(self, chunk: Chunk, names: list[str] | None = None) -> None:
        B = self.n_examples
        carried = 0 if self._carry_scores is None else self._carry_scores.shape[0]
        base = chunk.start - carried  # global row of the first extended row
        first = min(max(chunk.start, B), chunk.stop)  # rows of node 0 have no predecessor
        current = torch.arange(first, chunk.stop, device=chunk.scores.device) - base
        previous = current - B
        example = (current + base) % B
        step = (current + base) // B - 1

        scores = chunk.scores if self._carry_scores is None else torch.cat([self._carry_scores, chunk.scores])
        if self.step_score_change is None:
            self.step_score_change = scores.new_zeros((self.n_steps, B))
        self.step_score_change[step, example] = scores[current] - scores[previous]
        self._carry_scores = scores[-B:]

        for name in names if names is not None else list(chunk.values):
            y, g = chunk.values[name], chunk.grads[name]
            if name in self._carry:
                y = torch.cat([self._carry[name][0], y])
                g = torch.cat([self._carry[name][1], g])
            else:
                self.total[name] = y.new_zeros((B,) + y.shape[1:])
                self.step_sums[name] = y.new_zeros((self.n_steps, B))
            terms = step_terms(self.form, g[previous], g[current], y[previous], y[current])
            self.total[name].index_add_(0, example, terms)
            self.step_sums[name][step, example] = terms.flatten(1).sum(1)
            self._carry[name] = (y[-B:], g[-B:])

    def residuals(self) -> dict[str, Tensor]:
        """Per layer, (n_steps, B): each step's sum minus the change of the score over that step."""
        return {name: sums - self.step_score_change for name, sums in self.step_sums.items()}
