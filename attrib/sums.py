"""Streaming path sums over step-major chunks, with memory independent of the number of steps.

Work is done in blocks of rows small enough (``BLOCK_ELEMENTS``) that the temporaries of one block
are reused by the allocator instead of being fresh pages for every product: on CPU, page faults on
large fresh tensors cost as much as the arithmetic.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .sweep import Chunk

BLOCK_ELEMENTS = 1 << 21


def _per_row(weights: Tensor, like: Tensor) -> Tensor:
    return weights.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def _predecessors(kept: Tensor | None, current: Tensor, from_kept: bool) -> Tensor:
    """The rows a step's predecessors are read from: those kept from earlier chunks, or the chunk's own."""
    if not from_kept:
        return current
    assert kept is not None, "predecessors among the kept rows, but no rows were kept"
    return kept


def _blocks(rows: int, row_elements: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class WeightedSum:
    """``sum_k w_k h(alpha_k)`` per example, where ``h`` is a gradient (integrated gradients' form).

    >>> integral = WeightedSum(weights, n_examples)
    >>> path.evaluate(alphas, integral.add, input_grad=True)
    >>> integral.total[INPUT]   # sum_k w_k dF/dx at node k, per example
    """

    def __init__(self, weights: Tensor, n_examples: int) -> None:
        self.weights = weights
        self.n_examples = n_examples
        self.total: dict[str, Tensor] = {}

    def add(self, chunk: Chunk, grads: dict[str, Tensor] | None = None) -> None:
        for name, grad in (grads if grads is not None else chunk.grads).items():
            self.add_layer(chunk, name, grad)

    def add_layer(self, chunk: Chunk, name: str, grad: Tensor) -> None:
        weights = self.weights.to(chunk.example.device)[chunk.node]
        if name not in self.total:
            self.total[name] = grad.new_zeros((self.n_examples,) + grad.shape[1:])
        for rows in _blocks(grad.shape[0], grad[0].numel()):
            self.total[name].index_add_(0, chunk.example[rows], grad[rows] * _per_row(weights[rows], grad))


def step_terms(form: str, g_start: Tensor, g_end: Tensor, y_start: Tensor, y_end: Tensor) -> Tensor:
    """One step of the Riemann-Stieltjes sum: ``g_start dy`` (left) or ``(g_start + g_end)/2 dy``."""
    gradient = g_start if form == "left" else 0.5 * (g_start + g_end)
    return gradient * (y_end - y_start)


def trapezoid_sum(g: Tensor, y: Tensor, dim: int = 0) -> Tensor:
    """``sum_k (g_k + g_{k+1}) / 2 * (y_{k+1} - y_k)`` over the nodes along ``dim``: :func:`step_terms`
    for every step at once (differentiable; ``y`` may broadcast against ``g``)."""
    n, m = g.shape[dim], y.shape[dim]
    return step_terms("trapezoid", g.narrow(dim, 0, n - 1), g.narrow(dim, 1, n - 1), y.narrow(dim, 0, m - 1), y.narrow(dim, 1, m - 1)).sum(dim)


class StieltjesSum:
    """``sum_k G_k (y_{k+1} - y_k)`` per example and layer, streamed over chunks.

    Row ``r``'s predecessor on the path is row ``r - B``. Within a chunk, steps pair the slices
    ``rows[B:]`` and ``rows[:-B]``; the last B rows of a chunk are kept (copied) for the first steps of
    the next, so the result does not depend on the chunk size. Each step's sum and score change are
    kept, (n_steps, B), for the completeness residual per step.

    >>> sums = StieltjesSum('trapezoid', alphas.shape[0], n_examples)
    >>> path.evaluate(alphas, sums.add_scores, consume=sums.add_layer, layers=['features.28'])
    >>> sums.total['features.28'], sums.step_sums['features.28'] - sums.step_score_change   # conductance; per-step residuals
    """

    def __init__(self, form: str, n_nodes: int, n_examples: int) -> None:
        self.form = form
        self._half = 1.0 if form == "left" else 0.5
        self.n_examples = n_examples
        self.n_steps = n_nodes - 1
        self.total: dict[str, Tensor] = {}
        self.step_sums: dict[str, Tensor] = {}
        self.step_score_change: Tensor | None = None
        self._kept: dict[str, tuple[Tensor, Tensor]] = {}  # per layer, the rows just before the next chunk: (y, g)
        self._kept_scores: Tensor | None = None

    def _pairs(self, chunk: Chunk, kept_rows: int) -> list[tuple[slice, slice, int, bool]]:
        """(rows of the predecessors, rows of the successors, global row of the first successor,
        whether the predecessors are among the ``kept_rows`` rows kept from earlier chunks)."""
        B, start, stop = self.n_examples, chunk.start, chunk.stop
        pairs = []
        first = max(start, B)  # rows of node 0 have no predecessor
        last_from_kept = min(start + B, stop)
        if first < last_from_kept:  # predecessors among the kept rows [start - kept_rows, start)
            offset = kept_rows - start
            pairs.append((slice(first - B + offset, last_from_kept - B + offset),
                          slice(first - start, last_from_kept - start), first, True))
        if start + B < stop:
            pairs.append((slice(0, stop - start - B), slice(B, stop - start), start + B, False))
        return pairs

    def _keep(self, kept: Tensor | None, current: Tensor) -> Tensor:
        """The last (up to) B rows of ``kept`` followed by ``current``, as a copy."""
        B = self.n_examples
        if current.shape[0] >= B or kept is None:
            return current[-B:].clone()
        return torch.cat([kept, current])[-B:]

    def add(self, chunk: Chunk, names: list[str] | None = None) -> None:
        """The chunk's scores and its layers (all captured ones, or ``names``)."""
        self.add_scores(chunk)
        for name in names if names is not None else list(chunk.values):
            self.add_layer(chunk, name, chunk.values[name], chunk.grads[name])

    def add_scores(self, chunk: Chunk) -> None:
        B = self.n_examples
        if self.step_score_change is None:
            self.step_score_change = chunk.scores.new_zeros((self.n_steps, B))
        kept = self._kept_scores
        for before, after, first_row, from_kept in self._pairs(chunk, 0 if kept is None else kept.shape[0]):
            row = torch.arange(first_row, first_row + after.stop - after.start, device=chunk.scores.device)
            earlier = _predecessors(kept, chunk.scores, from_kept)
            self.step_score_change[row // B - 1, row % B] = chunk.scores[after] - earlier[before]
        self._kept_scores = self._keep(kept, chunk.scores)

    def add_layer(self, chunk: Chunk, name: str, y: Tensor, g: Tensor) -> None:
        """One layer's activations ``y`` and gradients ``g`` on the chunk's rows."""
        B = self.n_examples
        if name not in self.total:
            self.total[name] = y.new_zeros((B,) + y.shape[1:])
            self.step_sums[name] = y.new_zeros((self.n_steps, B))
        y_kept, g_kept = self._kept.get(name, (None, None))
        for before, after, first_row, from_kept in self._pairs(chunk, 0 if y_kept is None else y_kept.shape[0]):
            y0, g0 = _predecessors(y_kept, y, from_kept), _predecessors(g_kept, g, from_kept)
            y0, g0, y1, g1 = y0[before], g0[before], y[after], g[after]
            for rows in _blocks(y1.shape[0], y1[0].numel()):
                # the fast form of step_terms: in place, the trapezoid's 1/2 (exact) applied once on the sums
                terms = torch.sub(y1[rows], y0[rows])
                terms.mul_(g0[rows] if self.form == "left" else torch.add(g0[rows], g1[rows]))
                row = torch.arange(first_row + rows.start, first_row + rows.stop, device=terms.device)
                self.total[name].index_add_(0, row % B, terms, alpha=self._half)
                self.step_sums[name][row // B - 1, row % B] = terms.flatten(1).sum(1) * self._half
        self._kept[name] = (self._keep(y_kept, y), self._keep(g_kept, g))
