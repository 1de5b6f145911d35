"""Where LRP's propagation converts tensors to Python values (each one a host-device synchronisation on a GPU).

Groundwork for issue 20 ("LRP with no host-device synchronisation"): during one call every ``bool()``, ``item()``,
``tolist()``, ``float()``, ``int()``, ``nonzero`` and boolean-mask indexing of a tensor is recorded with the line of
attrib that asked for it (the tensor methods wrapped; a ``TorchFunctionMode`` does not see the backward pass, where
the rules run). It counts; issue 20's test will raise instead. Input checks before the propagation are counted too.
Counted for every composite on random-init VGG16 and ResNet50 (32 px, batch 1, CPU: the calls are the same on a
GPU, where each one waits for the device).

    python benchmarks/lrp_syncs.py

Writes benchmarks/results/issue20/lrp_syncs.{json,md}.
"""
from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attrib.lrp import COMPOSITES, LRP  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "issue20"

class SyncCounter:
    """Counts tensor-to-Python conversions and data-dependent shapes, by the attrib line that asked. The tensor
    methods are wrapped for the duration (a ``TorchFunctionMode`` would not see the backward pass, where LRP's
    rules run)."""

    METHODS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero", "__getitem__", "__setitem__")

    def __init__(self) -> None:
        self.sites: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "SyncCounter":
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        self._saved["torch.nonzero"] = torch.nonzero
        torch.nonzero = self._wrap("nonzero", torch.nonzero)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        torch.nonzero = self._saved.pop("torch.nonzero")  # type: ignore[assignment]
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original):
        counter = self

        def wrapped(*args, **kwargs):
            if name in ("__getitem__", "__setitem__"):
                index = args[1] if len(args) > 1 else None
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                    counter.sites[counter._site("bool-mask indexing")] += 1
            else:
                counter.sites[counter._site(name)] += 1
            return original(*args, **kwargs)
        return wrapped

    @staticmethod
    def _site(what: str) -> str:
        for frame in reversed(traceback.extract_stack()):
            if "/attrib/" in frame.filename and "/benchmarks/" not in frame.filename:
                return f"{what} at attrib/{frame.filename.split('/attrib/', 1)[1]}:{frame.lineno}"
        return f"{what} outside attrib"


def count(model: torch.nn.Module, x: torch.Tensor, composite: str) -> dict:
    factory = COMPOSITES[composite]
    try:
        rules = factory(low=float(x.min()), high=float(x.max()))
    except TypeError:
        rules = factory()
    explainer = LRP(model, rules)
    explainer.attribute(x, target=3, conservation=False)  # warm: plans and caches built outside the count
    counter = SyncCounter()
    with counter:
        explainer.attribute(x, target=3, conservation=False)
    return {"total": sum(counter.sites.values()), "sites": dict(counter.sites.most_common())}


def main() -> None:
    torch.manual_seed(0)
    models = {"vgg16": torchvision.models.vgg16(weights=None).eval(),
              "resnet50": torchvision.models.resnet50(weights=None).eval()}
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results: dict = {}
    for name, model in models.items():
        results[name] = {}
        for composite in COMPOSITES:
            if composite in ("attnlrp", "cp_lrp"):
                continue  # transformer composites: counted on a ViT in issue 20
            try:
                results[name][composite] = count(model, x, composite)
            except Exception as error:  # a composite that does not apply to the model: say so
                results[name][composite] = {"error": f"{type(error).__name__}: {error}"}
            print(name, composite, results[name][composite].get("total", results[name][composite].get("error")), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lrp_syncs.json").write_text(json.dumps(results, indent=1))
    lines = ["# Tensor-to-Python conversions in one LRP call (each a GPU sync)", "",
             f"torch {torch.__version__}, random init, 32 px, batch 1, `conservation=False`, after a warm-up call. "
             "Generated by `benchmarks/lrp_syncs.py`.", "",
             "| model | composite | conversions | where (count) |", "|---|---|---|---|"]
    for name, per in results.items():
        for composite, r in per.items():
            where = "; ".join(f"{site} ({n})" for site, n in r.get("sites", {}).items()) or r.get("error", "none")
            lines.append(f"| {name} | {composite} | {r.get('total', '—')} | {where} |")
    (RESULTS / "lrp_syncs.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "lrp_syncs.md").read_text())


if __name__ == "__main__":
    main()
