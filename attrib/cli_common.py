"""What the command line's runs share (image and text): completeness rows, the explained class, file-safe
names and the checks of numeric options."""
from __future__ import annotations

from .errors import InputError

LRP_COMPOSITE = "epsilon_plus"  # explain's default --composite


def lrp_composite(name: str, bounds):
    """The composite ``name`` built for a model whose inputs are bounded by ``bounds`` (``"imagenet"``,
    ``(low, high)`` in normalised units, or None): a composite that takes ``low``/``high`` (a z^B rule
    on the first layer) gets the model's own pixel range, not the ImageNet default of its factory."""
    import inspect

    import torch

    from .lrp import COMPOSITES
    from .normalization import normalized_range

    factory = COMPOSITES[name]
    parameters = inspect.signature(factory).parameters
    if bounds is None or "low" not in parameters or "high" not in parameters:
        return factory()
    low, high = (normalized_range() if bounds == "imagenet"
                 else tuple(torch.as_tensor(b, dtype=torch.float64) for b in bounds))
    return factory(low=low, high=high)


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def _check(method: str, where: str, value: float, reference: float, reference_name: str, tolerance: float,
           note: str = "") -> dict:
    """A completeness/conservation row: ``value`` should equal ``reference`` (named, e.g. F(x) - F(x'))."""
    error = _relative(float(value), float(reference))
    return {"method": method, "where": where, "value": float(value), "reference": float(reference),
            "reference_name": reference_name, "relative_error": error, "tolerance": tolerance,
            "passed": error <= tolerance, "note": note}


def _share(method: str, where: str, value: float, reference: float, reference_name: str = "F(x) - F(x')",
           short: str = "not a cut: share of F(x) - F(x')",
           note: str = "not a cut (a skip connection or another branch bypasses it): its conductance is the share of "
                       "the score change that flows through it, not a completeness check") -> dict:
    """A row that is information, not a check (no pass/fail): ``value`` as a share of ``reference``."""
    return {"method": method, "where": where, "value": float(value), "reference": float(reference),
            "reference_name": reference_name, "relative_error": None, "tolerance": None, "passed": None,
            "share": float(value) / float(reference) if float(reference) else float("nan"), "short": short, "note": note}


def _target(args, output) -> int:
    classes = output.shape[1]
    if args.target is None:
        return int(output.argmax(1))
    if not -classes <= args.target < classes:
        raise InputError(f"--target: {args.target} is out of range for {classes} classes (use 0..{classes - 1}, or "
                         "-1 for the last)")
    return args.target % classes


def _file_safe(name: str, most: int = 60) -> str:
    """A picture's name as part of a file name: letters, digits, '.', '-', '_' (others become '_'),
    at most ``most`` characters (the HTML shows the real name)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:most] or "image"


def _check_numbers(args) -> None:
    """Tolerances and thresholds are finite numbers in their range (NaN would mark every check failed);
    the normalisation's numbers are checked where the model is loaded."""
    import math

    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise InputError(f"--tolerance: must be a finite number >= 0, got {args.tolerance}")
    if getattr(args, "exact_max_regions", None) is not None and args.exact_max_regions < 1:
        raise InputError(f"--exact-max-regions: must be a positive number of regions, got {args.exact_max_regions}")
    if getattr(args, "distance", None) is not None and not (math.isfinite(args.distance) and 0 <= args.distance <= 2):
        raise InputError(f"--distance: must be a number from 0 to 2 (the shape distance's range), got {args.distance}")


def print_layer_shapes(model, inputs, header: str) -> None:
    """``attrib layers``: every leaf module's name, type and output shape (per example) in one forward
    pass of ``inputs`` without a graph, after ``header``; the hooks are removed whatever happens."""
    import torch

    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, args, output) -> None:  # returns None: the output flows on unchanged
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if name and not list(module.children())]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    print(header)
    for name, shape in shapes.items():
        print(f"{name:<32} {type(modules[name]).__name__:<20} {shape}")


def load_for_cli(args):
    """The model the options name (``--model``, ``--weights``, a custom model's input options), with
    ``args.composite`` settled (not given: the model's own, ``attnlrp`` for a model with attention, else the
    command's default) and ``args.rules``, the composite built with the model's pixel bounds for z^B."""
    from .cli_inputs import load_model

    loaded = load_model(args.model, args.weights, channels=args.channels, size=args.input_size, mean=args.mean,
                        std=args.std, output=args.output)
    if getattr(args, "composite", "") is None:
        from .attention import has_attention

        args.composite = loaded.composite or ("attnlrp" if has_attention(loaded.model) else args.default_composite)
    if getattr(args, "composite", None) is not None:
        args.rules = lrp_composite(args.composite, loaded.bounds)
    return loaded


def running_layers(model, x, names: list[str]) -> list[str]:
    """The layers of ``names`` that run in the model's forward pass on ``x`` (nn.MultiheadAttention's
    out_proj, for one, is only read as weights), in the order given."""
    import torch

    from .hooks import capture

    with capture(model, names) as cap, torch.no_grad():
        model(x.clone())
        return [name for name in names if name in cap.captured]
