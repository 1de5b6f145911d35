"""``attrib run``: a whole dataset explained in resumable shards, in one process or under ``torchrun``
(:mod:`attrib.dataset_run`).

>>> attrib run --model digits --dataset digits --method conductance --out runs/digits
>>> torchrun --nproc_per_node=2 -m attrib run --model digits --dataset digits --method conductance --out runs/digits
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import InputError

METHODS = ("conductance", "ig", "lrp", "saliency", "input_x_gradient", "deeplift")


class FolderDataset:
    """Image files in class sub-folders (``root/<class>/<file>``, classes in sorted order, as
    torchvision's ImageFolder), decoded faithfully (:mod:`attrib.images`) and sized and normalised for
    the model; ``dataset[i]`` is ``(x, class index)``."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

    def __init__(self, root: str | Path, loaded: Any) -> None:
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise InputError(f"--dataset: {root} has no class sub-folders (root/<class>/<image files>)")
        self.classes = classes
        self.files = [(path, index) for index, name in enumerate(classes)
                      for path in sorted((root / name).rglob("*")) if path.suffix.lower() in self.EXTENSIONS]
        if not self.files:
            raise InputError(f"--dataset: no image files under {root}'s class folders")
        self.loaded = loaded

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from .cli_inputs import _to_tensor
        from .images import decode, open_image, resize_crop

        path, label = self.files[index]
        array, _ = decode(open_image(path), self.loaded.channels)
        array, _ = resize_crop(array, self.loaded.size)
        return _to_tensor(array, self.loaded)[0], label


def _dataset(spec: str, loaded: Any) -> Any:
    """``digits`` (``digits:train``, ``digits:test``), a folder of class sub-folders, or
    ``package.module:factory`` returning a map-style dataset of ``(input, label)``."""
    if spec in ("digits", "digits:all", "digits:train", "digits:test"):
        if loaded.name not in ("digits", "digits-vit") and loaded.size != 32:
            raise InputError(f"--dataset: the digits are 1 x 32 x 32; --model {loaded.name} reads "
                             f"{loaded.channels} x {loaded.size} x {loaded.size}")
        from .models import DigitsDataset

        return DigitsDataset(spec.partition(":")[2] or "all")
    if Path(spec).is_dir():
        return FolderDataset(spec, loaded)
    if ":" in spec and not Path(spec).exists():
        import importlib

        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise InputError(f"--dataset: cannot load {spec!r} ({error})") from None
        return factory()
    raise InputError(f"--dataset: {spec!r} is not digits, a folder, or package.module:factory")


def _method(args: Any, loaded: Any, x: Any) -> tuple[Any, dict]:
    """The method object and its attribute() options."""
    from . import DeepLift, InputXGradient, IntegratedGradients, LayerConductance, Saliency
    from .lrp import LRP

    model = loaded.model
    if args.method == "conductance":
        layers = _layers(args, model, x)
        options: dict = {"n_steps": args.n_steps}
        if args.memory_budget is not None:
            options["memory_budget"] = args.memory_budget
        return LayerConductance(model, layers), options
    if args.method == "ig":
        options = {"n_steps": args.n_steps}
        if args.memory_budget is not None:
            options["memory_budget"] = args.memory_budget
        return IntegratedGradients(model), options
    if args.method == "lrp":
        return LRP(model, args.rules), {}
    if args.method == "deeplift":
        return DeepLift(model), {}
    if args.method == "saliency":
        return Saliency(model), {}
    return InputXGradient(model), {}


def _layers(args: Any, model: Any, x: Any) -> list[str]:
    """``--layers``, or every convolution that runs (the paper's per-layer conductance)."""
    from .cli_common import running_layers
    from .hooks import resolve_layers
    from .module_types import CONVOLUTIONS

    if args.layers:
        try:
            return [name for name, _ in resolve_layers(model, [n.strip() for n in args.layers.split(",") if n.strip()])]
        except InputError as error:
            raise InputError(f"--layers: {str(error).split(': ', 1)[-1]}") from None
    running = running_layers(model, x, [n for n, m in model.named_modules() if isinstance(m, CONVOLUTIONS)])
    if not running:
        raise InputError("--layers: the model runs no convolution; name the layers to explain")
    return running


def _first_input(dataset: Any, spec: str, loaded: Any) -> Any:
    """The dataset's first input as a batch of one, after checking that it is a map-style dataset of
    (input tensor, label) items that the model accepts."""
    import torch

    from .cli_inputs import first_line

    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise InputError(f"--dataset: {spec} gave a {type(dataset).__name__}, not a map-style dataset (len and [i])")
    if len(dataset) == 0:
        raise InputError(f"--dataset: {spec} has no examples")
    try:
        item = dataset[0]
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"--dataset: reading its first item failed: {first_line(error)}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)):
        raise InputError(f"--dataset: its items are {type(item).__name__}; they must be (input tensor, label) pairs")
    x = item[0].unsqueeze(0)
    param = next(iter(loaded.model.parameters()), None)
    if param is not None and x.dtype != param.dtype:
        raise InputError(f"--dataset: its inputs are {x.dtype} but the model's weights are {param.dtype}")
    try:
        with torch.no_grad():
            loaded.model(x)
    except Exception as error:
        raise InputError(f"--model: {loaded.name} does not accept the dataset's inputs of shape "
                         f"{tuple(item[0].shape)}: {first_line(error)}") from None
    return x


def _target(text: str) -> str | int:
    if text in ("label", "predicted"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label, predicted or a class index, got {text!r}") from None


def run(args: Any) -> int:
    import torch

    from .cli_common import load_for_cli as _load
    from .dataset_run import run_dataset

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for name in ("n_steps", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise InputError(f"--workers: must be >= 0, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit: must be >= 1, got {args.limit}")
    if args.method != "conductance" and args.layers:
        raise InputError(f"--layers: only conductance explains layers; --method {args.method} explains the input")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device: {args.device} was asked for, but torch sees no CUDA device here")
    loaded = _load(args)
    dataset = _dataset(args.dataset, loaded)
    x = _first_input(dataset, args.dataset, loaded)
    method, options = _method(args, loaded, x)
    ablation = [n.strip() for n in args.ablation_layers.split(",") if n.strip()] if args.ablation_layers else []
    if ablation:
        from .hooks import resolve_layers

        try:
            resolve_layers(loaded.model, ablation)
        except InputError as error:
            raise InputError(f"--ablation-layers: {str(error).split(': ', 1)[-1]}") from None
    from attrib.viz.dataset import write_summary_page

    per_example = []
    if args.graph_k is not None:
        from attrib.graphs import PathGraphRows

        try:
            per_example.append(PathGraphRows(args.graph_k, args.graph_paths, args.composite))
        except InputError as error:
            raise InputError(f"--graph-k: {error}") from None
    try:
        result = run_dataset(method, dataset, args.out, target=args.target, batch_size=args.batch_size,
                             num_workers=args.workers, shard_size=args.shard_size, maps=not args.no_maps,
                             attribute_kwargs=options, limit=args.limit, progress=not args.quiet, ablation_layers=ablation,
                             per_example=per_example, top_k=args.top_k, summary=not args.no_summary,
                             summary_page=write_summary_page, device=args.device)
    except KeyboardInterrupt:
        shards = Path(args.out) / "shards"
        done = len([p for p in shards.iterdir() if p.is_dir() and not p.name.startswith(".")]) if shards.is_dir() else 0
        print(f"attrib run: {done} finished shards are kept in {args.out}; the same command resumes from them",
              file=sys.stderr)
        raise
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        count = result.manifest["config"]["count"]
        summary = "" if args.no_summary else f"; summary in {Path(args.out) / 'summary' / 'index.html'}"
        print(f"wrote {Path(args.out)}: {count} examples in {result.shards} shards ({len(result.computed)} computed by "
              f"this process, {len(result.skipped)} found done) in {result.seconds:.1f} s{summary}", file=sys.stderr)
    return 0


def add_parser(commands: Any, model_options, composite_option) -> None:
    p = commands.add_parser("run", help="explain a whole dataset in resumable shards (one process, or under torchrun)")
    p.add_argument("--model", default="digits", help="digits, digits-vit, a torchvision name, or package.module:factory")
    model_options(p)
    p.add_argument("--dataset", default="digits", help="digits (or digits:train, digits:test), a folder of class "
                                                       "sub-folders of images, or package.module:factory")
    p.add_argument("--method", default="conductance", choices=METHODS, help="what to compute (default conductance)")
    p.add_argument("--layers", default=None, help="conductance: comma-separated layers (default every convolution)")
    p.add_argument("--n-steps", type=int, default=50, dest="n_steps", help="integration steps (conductance, ig)")
    p.add_argument("--target", type=_target, default="label", help="label (default), predicted, or a class index")
    p.add_argument("--batch-size", type=int, default=32, dest="batch_size", help="examples per batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--shard-size", type=int, default=256, dest="shard_size", help="examples per shard (the resume unit)")
    p.add_argument("--limit", type=int, default=None, help="the first N examples only")
    p.add_argument("--no-maps", action="store_true", dest="no_maps", help="store per-channel sums and deltas, not the maps")
    p.add_argument("--memory-budget", type=int, default=None, dest="memory_budget",
                   help="bytes for one chunk of the integration (conductance, ig)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (bit-identical results across process counts need the same number)")
    p.add_argument("--top-k", type=int, default=5, dest="top_k", help="summary: channels per example counted as its top")
    p.add_argument("--ablation-layers", default=None, dest="ablation_layers",
                   help="comma-separated layers whose every filter is ablated per example (ablation agreement)")
    p.add_argument("--graph-k", type=int, default=None, dest="graph_k",
                   help="build each example's LRP path graph with K channels per layer (class-level graphs)")
    p.add_argument("--graph-paths", type=int, default=5, dest="graph_paths", help="best paths kept per example's graph")
    p.add_argument("--no-summary", action="store_true", dest="no_summary", help="shards only: no per-class summary")
    p.add_argument("--device", default=None, help="cpu, or cuda (each rank takes cuda:LOCAL_RANK); default: cpu")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier run of the same command (resumed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    composite_option(p, "epsilon_plus")
    p.set_defaults(run=run)
