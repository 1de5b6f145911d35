"""Chunk sizes from a memory budget (``internal_batch_size="auto"``, the default of every batched method).

The first chunk is a probe of one row. Its footprint per row is measured while it runs: on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated before; on CPU, where
no allocator keeps a peak, the bytes autograd saves for the backward pass (``saved_tensors_hooks``)
plus ``TRANSIENT`` times the largest module output and the captured layers with their gradients — the
terms that are alive together at the peak of a forward+backward pass. (``TRANSIENT`` = 4 was measured:
VGG16 at 224 px, conductance at features.28, whose graph-free forward costs 37 MB per row of real RSS
against 26 MB for a layer's input and output alone.) The other chunks get as many rows as fit in the
budget: ``memory_budget`` bytes if given, else a fraction of the memory free now (``CPU_FRACTION`` of
MemAvailable or of what a container's memory limit leaves, ``GPU_FRACTION`` of the free device memory
plus the allocator's unused cache), each row counted ``SAFETY`` times. On CUDA the probe resets the
device's peak-memory statistics (``torch.cuda.reset_peak_memory_stats``).
On CPU the chunk sizes depend only on the model, the inputs and the budget, never on the allocator's
state, so two runs give the same chunks and the same numbers.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .checks import check_count
from .errors import InputError, InputTypeError

AUTO = "auto"
CPU_FRACTION = 0.25  # of the memory available now: the rest is left to the process and the machine
GPU_FRACTION = 0.5
SAFETY = 1.5  # each measured row counts this much
TRANSIENT = 4  # on CPU, module outputs alive at once without a graph: a layer's input and output, and oneDNN's reordered copies of both
PROBE_ROWS = 1  # the probe must fit whatever the budget: one row, whose cost is then known


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _container_free() -> int | None:
    """What a cgroup memory limit (v2, else v1) leaves to this process's group, if one is set."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number
            return max(0, limit - usage)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes free now: on CUDA ``torch.cuda.mem_get_info`` plus what PyTorch's allocator holds unused; on CPU
    MemAvailable (Linux; else the free physical pages), and no more than a container's memory limit leaves."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = None
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    container = _container_free()
    return available if container is None else min(available, container)


def check_budget(memory_budget: Any) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise InputTypeError(f"memory_budget must be a number of bytes, got {type(memory_budget).__name__}")
    if not memory_budget > 0:
        raise InputError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    return int(memory_budget)


def budget_bytes(device: torch.device, memory_budget: int | None) -> int:
    if memory_budget is not None:
        return memory_budget
    return int(available_memory(device) * (GPU_FRACTION if device.type == "cuda" else CPU_FRACTION))


class Footprint:
    """Peak bytes of the work done inside ``with`` (see the module docstring for how).

    >>> with Footprint(model, x.device) as footprint:
    ...     model(x).sum().backward()
    >>> footprint.peak
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.peak = 0
        self._saved: dict[int, int] = {}
        self._largest = 0
        self._stack = ExitStack()
        self._base = 0
        self._params: set[int] = set()

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params:  # the weights are there whatever the chunk size
            self._saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def _output(self, module: nn.Module, args: Any, output: Any) -> None:
        tensors = [output] if isinstance(output, Tensor) else [t for t in _flatten(output) if isinstance(t, Tensor)]
        for tensor in tensors:
            self._largest = max(self._largest, tensor.numel() * tensor.element_size())

    def add(self, tensors: Iterator[Tensor]) -> None:
        """Count tensors held beside the graph (the captured layers and their gradients)."""
        if self.device.type != "cuda":
            self.peak += sum(t.numel() * t.element_size() for t in tensors)

    def __enter__(self) -> "Footprint":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._params = {t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        for module in self.model.modules():
            if not list(module.children()):
                self._stack.callback(module.register_forward_hook(self._output).remove)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak += sum(self._saved.values()) + TRANSIENT * self._largest


def _flatten(value: Any) -> list:
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    return [value]


class ChunkPlan:
    """The row ranges of a batch of ``rows`` rows: fixed chunks of ``internal_batch_size`` rows
    (``None``: one chunk), or, for ``"auto"``, a probe chunk then chunks sized by the budget.

    >>> plan = ChunkPlan("auto", rows=1000, device=torch.device("cpu"))
    >>> for start, stop in plan:            # after the first chunk, plan.measured(peak_bytes)
    ...     ...
    """

    def __init__(self, internal_batch_size: Any, rows: int, device: torch.device, memory_budget: int | None = None) -> None:
        self.rows, self.device = rows, device
        self.auto = internal_batch_size == AUTO
        self.memory_budget = check_budget(memory_budget)
        if self.auto:
            self.size = min(rows, PROBE_ROWS)
        elif internal_batch_size is None:
            self.size = rows
        elif isinstance(internal_batch_size, str):
            raise InputError(f"internal_batch_size must be 'auto', None or a positive int, got {internal_batch_size!r}")
        else:
            self.size = check_count("internal_batch_size", internal_batch_size)
        self.per_row: float | None = None
        self.sizes: list[int] = []

    @property
    def probing(self) -> bool:
        return self.auto and self.per_row is None

    def measured(self, peak: int, rows: int) -> None:
        """The probe's peak bytes for ``rows`` rows: the rest of the chunks are sized from it."""
        self.per_row = max(peak, 1) * SAFETY / rows
        self.size = max(1, int(budget_bytes(self.device, self.memory_budget) // self.per_row))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = 0
        while start < self.rows:
            stop = min(start + self.size, self.rows)
            self.sizes.append(stop - start)
            yield start, stop
            start = stop
