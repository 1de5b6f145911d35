"""Heatmap overlays and the seeds' figures (method grid, conductance distribution, ascent triptych,
deconvolution reconstructions, K-path heatmaps). matplotlib with the Agg backend; deterministic
(no randomness, fixed sizes and dpi). Wherever colour encodes a number there is a colour bar that
says what the number is and where it is clipped.

Images may be normalised tensors (give ``mean``/``std``), 0-1 or 0-255 arrays, ``(C, H, W)``,
``(H, W, C)`` or ``(H, W)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from attrib.errors import InputError  # noqa: E402
from attrib.graphs.heatmaps import shape_distance, share, unit_l1  # noqa: E402

DPI = 110


def _array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def to_display(image, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """``(H, W, 3)`` floats in 0-1. With ``mean``/``std`` the image is un-normalised first;
    otherwise 0-255 data (max > 1.5, min >= 0) is divided by 255 and anything else outside 0-1 is
    rescaled from its own min and max."""
    array = _array(image)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise InputError(f"image: one image at a time, got a batch of {array.shape[0]}")
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise InputError(f"image: expected (C, H, W), (H, W, C) or (H, W) with 1 or 3 channels, got {_array(image).shape}")
    if mean is not None or std is not None:
        array = array * np.asarray(std if std is not None else 1.0) + np.asarray(mean if mean is not None else 0.0)
    elif array.max() > 1.5 and array.min() >= 0:
        array = array / 255.0
    elif array.min() < 0 or array.max() > 1:
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    array = np.clip(array, 0, 1)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _map2d(attribution) -> np.ndarray:
    """A 2-D map: channels summed (``(C, H, W)`` or ``(1, C, H, W)``), or as is."""
    array = _array(attribution)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        array = array.sum(0)
    if array.ndim != 2:
        raise InputError(f"attribution: expected a (C, H, W) or (H, W) map, got shape {array.shape}")
    return array


def clip_value(values: np.ndarray, percentile: float = 99.0) -> float:
    """The percentile of |values| used as the colour limit (1 if everything is 0)."""
    limit = float(np.percentile(np.abs(values), percentile))
    if limit <= 0:
        limit = float(np.abs(values).max())
    return limit if limit > 0 else 1.0


def overlay(ax, image, attribution, signed: bool = True, percentile: float = 99.0, alpha: float = 0.6,
            mean=None, std=None, title: str | None = None, limit: float | None = None):
    """Draw ``attribution`` over a grey version of ``image``: signed (blue < 0 < red, centred on 0,
    clipped at ``limit``, default the percentile of |a|) or absolute (0 to the limit). Returns the
    heat layer's ``AxesImage`` (for a colour bar)."""
    base = to_display(image, mean, std).mean(-1)
    heat = _map2d(attribution)
    if heat.shape != base.shape:
        raise InputError(f"attribution: map {heat.shape} does not match the image {base.shape}")
    ax.imshow(base, cmap="gray", vmin=0, vmax=1)
    limit = clip_value(heat, percentile) if limit is None else float(limit)
    if signed:
        drawn = ax.imshow(heat, cmap="bwr", vmin=-limit, vmax=limit, alpha=alpha)
    else:
        drawn = ax.imshow(np.abs(heat), cmap="inferno", vmin=0, vmax=limit, alpha=alpha)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return drawn


def _colorbar(fig, drawn, label: str, ax=None, cax=None, orientation: str = "vertical"):
    """A colour bar for ``drawn`` (beside ``ax``, or in ``cax``), ticks at its ends and 0."""
    low, high = drawn.get_clim()
    bar = fig.colorbar(drawn, ax=ax, cax=cax, orientation=orientation, fraction=0.046, pad=0.04,
                       ticks=sorted({low, 0.0, high}) if low < 0 < high else [low, high], format="%.2g")
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return bar


def _plain(ax, picture, title: str) -> None:
    """An image panel without ticks."""
    ax.imshow(picture)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _row(panels: int, title: str | None, height: float = 2.6):
    fig, axes = plt.subplots(1, panels, figsize=(2.3 * panels, height))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _save(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    return fig


def method_grid(image, maps: Mapping[str, object], path=None, mean=None, std=None, signed: Mapping[str, bool] | None = None,
                title: str | None = None, percentile: float = 99.0):
    """The seed's Figure 4: original | one overlay per method, in the order given. Every map has its
    own colour scale, clipped at the ``percentile`` of its |a|, with its own colour bar below it."""
    signed = signed or {}
    fig, axes = _row(len(maps) + 1, title, height=3.1)
    _plain(axes[0], to_display(image, mean, std), "original")
    for ax, (name, attribution) in zip(axes[1:], maps.items()):
        is_signed = signed.get(name, True)
        drawn = overlay(ax, image, attribution, signed=is_signed, percentile=percentile, mean=mean, std=std, title=name)
        _colorbar(fig, drawn, f"{'' if is_signed else '|'}a{'' if is_signed else '|'}, clipped at p{percentile:g} of |a|",
                  ax=ax, orientation="horizontal")
    return _save(fig, path)


def conductance_distribution(scores, top: int | None = None, path=None, layer: str = "", title: str | None = None):
    """The seed's Figure 2: every filter's aggregated conductance (max over H x W), the top one marked."""
    values = _array(scores).reshape(-1)
    top = int(np.argmax(values)) if top is None else int(top)
    fig, ax = plt.subplots(figsize=(7, 3))
    colours = ["#d62728" if i == top else "#1f77b4" for i in range(values.size)]
    ax.bar(np.arange(values.size), values, color=colours, width=0.9)
    ax.annotate(f"filter {top}: {values[top]:.3g}", (top, values[top]), textcoords="offset points", xytext=(6, 4),
                fontsize=8, color="#d62728")
    low, high = min(0.0, float(values.min())), max(0.0, float(values.max()))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.18 * (high - low) + 1e-12)  # room for the label
    ax.set_xlabel(f"filter of {layer}" if layer else "filter")
    ax.set_ylabel("aggregated conductance\n(max over H x W)")
    ax.set_title(title or "per-filter conductance", fontsize=10)
    return _save(fig, path)


def ascent_triptych(original, optimised, gradient_effect, path=None, mean=None, std=None, title: str | None = None):
    """The seed's Figure 3: original | image after conductance ascent | gradient effect (|gradient| of
    the strongest neuron, with its non-zero region outlined; colour bar clipped at the 99th percentile)."""
    fig, axes = plt.subplots(1, 3, figsize=(8.0, 2.8))
    _plain(axes[0], to_display(original, mean, std), "original")
    _plain(axes[1], to_display(optimised, mean, std), "after conductance ascent")
    effect = np.abs(_map2d(gradient_effect))
    drawn = axes[2].imshow(effect, cmap="inferno", vmin=0, vmax=clip_value(effect))
    if (effect > 0).any():
        axes[2].contour(effect > 0, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[2].set_title("gradient effect", fontsize=9)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    _colorbar(fig, drawn, "|gradient|, clipped at p99", ax=axes[2])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def reconstructions(image, maps: Mapping[str, object], path=None, mean=None, std=None, title: str | None = None):
    """Deconvolution reconstructions: original | one panel per selection, each min-max rescaled to
    0-1 on its own (as Zeiler and Fergus show them; the titles say so: no colour scale to read)."""
    fig, axes = _row(len(maps) + 1, title)
    _plain(axes[0], to_display(image, mean, std), "original")
    for ax, (name, value) in zip(axes[1:], maps.items()):
        array = _array(value)
        while array.ndim > 3:
            array = array[0]
        _plain(ax, to_display(array), f"{name}, min-max rescaled")
    return _save(fig, path)


@dataclass
class KPathScale:
    """The one scale of :func:`k_path_heatmaps`: every map divided by its own L1 norm (sum of
    |relevance| over all input elements), channels summed, drawn between -``limit`` and ``limit``
    (the ``percentile`` of |value| over every panel together). ``shares[k]``: sum of the K-path map /
    sum of the full map; ``distances[k]``: the shape distance (graphs.heatmaps) to the full map.

    >>> scale = k_path_scale(full, {1: maps[0], 5: maps[4]})
    >>> scale.limit, scale.caption   # the shared colour limit and the sentence that says so
    """

    limit: float
    percentile: float
    shares: dict[int, float]
    distances: dict[int, float]

    @property
    def label(self) -> str:
        """The colour bar's label."""
        return f"relevance / its map's L1 norm\n(one scale, clipped at ±{self.limit:.2g})"

    @property
    def caption(self) -> str:
        """A sentence for the figure's caption."""
        return (f"Each map is divided by its own L1 norm (sum of |relevance| over the input), so the panels compare "
                f"shape, not amount; all panels share one colour scale (blue < 0 < red), clipped at ±{self.limit:.3g}, "
                f"the {self.percentile:g}th percentile of |value| over all panels. Panel titles: share = sum of the K-path "
                f"map / sum of the full map; d = shape distance to the full map (0: same shape, 2: nothing in common).")


def _unit_maps(full, maps: Mapping[int, object]) -> list[np.ndarray]:
    """The full map and every K-path map, each divided by its L1 norm, channels summed."""
    return [_map2d(unit_l1(torch.as_tensor(_array(value)))) for value in [full, *maps.values()]]


def k_path_scale(full, maps: Mapping[int, object], percentile: float = 99.0) -> KPathScale:
    """The scale :func:`k_path_heatmaps` draws with (to caption the figure)."""
    limit = clip_value(np.concatenate([p.reshape(-1) for p in _unit_maps(full, maps)]), percentile)
    whole = torch.as_tensor(_array(full))
    parts = {k: torch.as_tensor(_array(value)) for k, value in maps.items()}
    return KPathScale(limit=limit, percentile=percentile, shares={k: share(p, whole) for k, p in parts.items()},
                      distances={k: shape_distance(p, whole) for k, p in parts.items()})


def k_path_heatmaps(image, full, maps: Mapping[int, object], path=None, mean=None, std=None, title: str | None = None,
                    percentile: float = 99.0, scale: KPathScale | None = None):
    """The full LRP heatmap beside the K-path heatmaps (``maps``: K -> map), all on the one scale of
    :func:`k_path_scale` (each map / its L1 norm, one shared symmetric colour limit, one colour bar);
    each K panel's title gives the share of the relevance it carries and its shape distance. ``scale``:
    the one a caller already computed for these maps (to caption the figure), else computed here."""
    scale = k_path_scale(full, maps, percentile) if scale is None else scale
    panels = len(maps) + 1
    fig = plt.figure(figsize=(2.3 * panels + 0.7, 2.9))
    grid = fig.add_gridspec(1, panels + 1, width_ratios=[1.0] * panels + [0.06])
    axes = [fig.add_subplot(grid[0, i]) for i in range(panels)]
    titles = ["full LRP\nshare 1, d = 0"] + [f"K = {k} paths\nshare {scale.shares[k]:.2g}, d = {scale.distances[k]:.2f}"
                                            for k in maps]
    for ax, panel, text in zip(axes, _unit_maps(full, maps), titles):
        drawn = overlay(ax, image, panel, mean=mean, std=std, title=text, limit=scale.limit)
    _colorbar(fig, drawn, scale.label, cax=fig.add_subplot(grid[0, panels]))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def figure_pixels(fig) -> np.ndarray:
    """The rendered RGBA pixels of a figure (for tests and comparisons)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def head_conductance(image, heads: Mapping[str, object], grid: int | None, mean=None, std=None, title: str | None = None):
    """Conductance per attention head: one row per attention module, one panel per head. ``heads``
    maps a module's name to its (H, L) conductance (class token first, then the patches); with ``grid``
    (patches per side) the patch tokens are drawn on the image, else as a heads x tokens heatmap.
    One symmetric colour scale for all panels; the class token's value is in each title."""
    rows = list(heads.items())
    values = [_array(v) for _, v in rows]
    limit = max(float(np.abs(v).max()) for v in values) or 1.0
    count = max(v.shape[0] for v in values)
    if grid is None:
        fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.2 + 0.5 * count * len(rows)), squeeze=False)
        for ax, (name, _), value in zip(axes[:, 0], rows, values):
            drawn = ax.imshow(value, cmap="bwr", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_ylabel("head")
            ax.set_title(name, fontsize=8)
        _colorbar(fig, drawn, "conductance")
        fig.suptitle(title or "conductance per head and token", fontsize=10)
        return fig
    picture = to_display(image, mean, std)
    limit = max(float(np.abs(v[:, 1:]).max()) for v in values) or 1.0  # the patches' scale: the class token is in the titles
    fig, axes = plt.subplots(len(rows), count, figsize=(1.9 * count + 0.8, 2.0 * len(rows) + 0.6), squeeze=False)
    for r, ((name, _), value) in enumerate(zip(rows, values)):
        for h in range(count):
            ax = axes[r, h]
            ax.axis("off")
            if h >= value.shape[0]:
                continue
            patches = value[h, 1:].reshape(grid, grid)
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            upsampled = np.kron(patches, np.ones((picture.shape[0] // grid, picture.shape[1] // grid)))
            drawn = ax.imshow(upsampled, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.65)
            ax.set_title(f"{name.split('.')[-2] if '.' in name else name} head {h}\nclass token {value[h, 0]:+.3f}", fontsize=7)
    _colorbar(fig, drawn, "conductance at the patch tokens", ax=axes.ravel().tolist())
    fig.suptitle(title or "conductance per attention head (patch tokens on the image; the class token's value in each title)",
                 fontsize=10)
    return fig


def perturbation_curves(rows: Sequence[Mapping], path=None, title: str | None = None):
    """Deletion and insertion curves side by side, one line per method (``rows``: the report's faithfulness rows,
    each with ``method``, ``fractions``, ``deletion_curve``, ``insertion_curve`` and their AUCs)."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharey=True)
    for row in rows:
        for ax, mode in zip(axes, ("deletion", "insertion")):
            ax.plot(row["fractions"], row[f"{mode}_curve"], lw=1.2, label=f"{row['method']} ({row[f'{mode}_auc']:.3f})")
    for ax, mode, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.set_title(f"{mode}: most relevant pixels first (AUC, {better} is better)", fontsize=8)
        ax.set_xlabel("fraction of pixels changed")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("target probability")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
