"""The conservation report: for every layer call, the relevance entering it (at its output) and
leaving it (at its input), per example, so a reader sees where relevance is absorbed or created."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerBalance:
    """One layer call: ``entering`` and ``leaving`` are (B,) float64 sums of relevance.

    >>> row = LRP(model).attribute(x, target=3).info['conservation'].rows[0]
    >>> row.name, row.rule, row.difference   # relevance absorbed (< 0) or created at that layer, per example
    """

    name: str
    kind: str
    rule: str
    entering: Tensor | None = None
    leaving: Tensor | None = None

    def add(self, entering: Tensor, leaving: Tensor) -> None:
        self.entering = entering if self.entering is None else self.entering + entering
        self.leaving = leaving if self.leaving is None else self.leaving + leaving

    @property
    def difference(self) -> Tensor:
        """``leaving - entering``: negative where relevance is absorbed (bias, epsilon), positive where created."""
        assert self.entering is not None and self.leaving is not None, f"no relevance recorded for {self.name!r}"
        return self.leaving - self.entering


@dataclass
class ConservationReport:
    """Rows in forward order, with the relevance the backward pass started from and the relevance
    that arrived at the input, each (B,). Listed: every layer call with a rule, residual additions and
    functional poolings. Not listed, because their gradient moves relevance unchanged: reshapes,
    concatenations, eval-mode dropout and winner-take-all max pooling (a tie in a window hands the
    whole share to one input).

    >>> report = LRP(model, 'epsilon').attribute(x, target=3).info['conservation']
    >>> print(report.table(0)); report.worst(0).name; report.total_difference
    """

    rows: list[LayerBalance]
    start: Tensor
    input: Tensor
    notes: list[str] = field(default_factory=list)

    @property
    def total_difference(self) -> Tensor:
        """``input - start`` per example: what the whole pass absorbed (< 0) or created (> 0)."""
        return self.input - self.start

    def worst(self, example: int = 0) -> LayerBalance:
        """The row with the largest ``|difference|`` for one example."""
        return max(self.rows, key=lambda row: abs(float(row.difference[example])))

    def table(self, example: int = 0) -> str:
        """A plain-text table for one example."""
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'rule':<28} {'entering':>13} {'leaving':>13} {'difference':>12} {'relative':>9}"]
        for r in self.rows:
            assert r.entering is not None and r.leaving is not None  # a report keeps only rows that relevance passed
            entering, leaving = float(r.entering[example]), float(r.leaving[example])
            relative = (leaving - entering) / abs(entering) if entering else float("nan")
            lines.append(f"{r.name:<{width}}  {r.rule[:28]:<28} {entering:13.6g} {leaving:13.6g} "
                         f"{leaving - entering:12.3e} {relative:9.2e}")
        start, arrived = float(self.start[example]), float(self.input[example])
        lines.append(f"start {start:.6g} -> input {arrived:.6g} (difference {arrived - start:.3e})")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table(0)


def per_example_sum(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(tensor.shape[0], -1).sum(1).to(torch.float64)
