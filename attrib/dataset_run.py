"""Dataset-scale attribution runs: sharded, resumable, in one process or under ``torchrun``.

``run_dataset(method, dataset, out)`` explains every example of a map-style dataset (``dataset[i]`` is
``(input, label)``, as torchvision's datasets give) with any method of the library, and writes the
per-example results to ``out`` in **shards**:

- **Sharding.** The indices ``0..N-1`` are cut into consecutive shards of ``shard_size`` examples;
  shard ``s`` belongs to rank ``s % world_size``. Every index is in exactly one shard (no padding, no
  duplicates), and which examples a shard holds does not depend on how many processes run. Within a
  shard the examples are batched in order (``batch_size``), so a shard's numbers are the same whichever
  rank computes it, and the results are bit-identical to a single-process run (with the same number of
  threads per process: CPU kernels may sum in another order with more threads).
- **Shards on disk** (``out/shards/00012/``): one ``.npy`` file per array (memory-mappable; loading never
  unpickles) and ``shard.json`` with each file's SHA-256 and the run's configuration hash. A shard is
  written in a hidden folder beside it (``.00012.partial-<rank>-<pid>``), every file flushed and synced,
  and renamed into place: a shard folder that exists is complete.
- **Resuming.** Rerunning the same command skips the shards already on disk (their checksums are
  verified) and removes the hidden partial folders left by a killed run. ``out/manifest.json`` holds
  the configuration (model weights' hash, method and its settings, dataset fingerprint, targets,
  batching); a run whose configuration differs refuses to mix with the old shards, naming what
  changed. A shard whose files do not match their checksums, or that another configuration wrote, is
  an error naming it.
- **Processes.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is created here (gloo on CPU,
  NCCL when the model is on a GPU, one GPU per local rank) unless the caller made one. Every rank shows
  a progress bar of its own shards; rank 0's counts the examples done by all ranks.

Per example (row) a shard holds ``index``, ``label``, ``target``, ``output`` (the explained score) and,
where the method has them, ``baseline_output``; per map (a layer's name, or ``input``) the attribution
(``maps=True``), its per-channel sums ``filters`` (N, C) and the completeness ``delta``.

>>> run = run_dataset(LayerConductance(model, ["features.3", "features.7"]), DigitsDataset(), "runs/digits",
...                   attribute_kwargs={"n_steps": 32})
>>> run.array("filters", "features.7").shape      # (1797, 32): per example, per filter
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError, InputTypeError

FORMAT = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
TOOL = "attrib run"
TARGETS = ("label", "predicted")


# ----------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` (``local_rank`` on its node); ``owned``: the process
    group was created by :func:`world` (and is destroyed by the run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(device: torch.device | None = None) -> World:
    """The process group of a ``torchrun`` launch (created here if ``WORLD_SIZE`` > 1 and none exists:
    gloo, or NCCL for a CUDA device), or a single process."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owned = False
    if size > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        owned = True
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local, owned)
    return World(0, 1, local, False)


def _barrier(place: World) -> None:
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()


def shard_indices(count: int, shard_size: int) -> list[range]:
    """Consecutive shards of ``shard_size`` indices covering ``0..count-1`` (the last may be shorter)."""
    return [range(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def shards_of(rank: int, size: int, shards: int) -> list[int]:
    """The shards rank ``rank`` of ``size`` computes: ``s % size == rank`` (disjoint, every shard once)."""
    return list(range(rank, shards, size))


# ------------------------------------------------------------------------------------ configuration
def _host(tensor: Tensor) -> Tensor:
    """The tensor on the CPU, contiguous, in a dtype numpy holds (bfloat16 as float32), for hashing."""
    data = tensor.detach().to("cpu").contiguous()
    return data.float() if data.dtype == torch.bfloat16 else data


def _digest_tensor(tensor: Tensor) -> str:
    data = _host(tensor)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16] + f":{tuple(data.shape)}:{data.dtype}"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, Tensor):
            continue
        data = _host(tensor)
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a setting: tensors by their hash, modules by their type."""
    if isinstance(value, Tensor):
        return {"tensor": _digest_tensor(value)}
    if isinstance(value, nn.Module):
        return {"module": type(value).__name__}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and depth < 4:
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, dict) and depth < 4:
        return {str(k): _describe(v, depth + 1) for k, v in value.items()}
    text = repr(value)
    return {"object": type(value).__name__} if " at 0x" in text else text  # no address: it changes every run


def method_description(method: Any) -> dict:
    """The method's class and its settings (every attribute but the model), for the manifest."""
    if not hasattr(method, "attribute"):
        raise InputTypeError(f"method: expected an attrib method (with .attribute), got {type(method).__name__}")
    settings = {name: _describe(value) for name, value in sorted(vars(method).items())
                if not name.startswith("_") and not isinstance(value, nn.Module)}
    return {"class": f"{type(method).__module__}.{type(method).__qualname__}", "settings": settings}


def _model_of(method: Any) -> nn.Module:
    model = getattr(method, "model", None) or getattr(method, "forward_func", None)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"method: {type(method).__name__} has no .model that is an nn.Module")
    return model


def _example(dataset: Any, index: int) -> tuple[Tensor, int]:
    item = dataset[index]
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor)):
        raise InputTypeError(f"dataset: item {index} is {type(item).__name__}; expected (input tensor, label), as "
                             "torchvision's datasets give")
    label = item[1]
    if isinstance(label, Tensor):
        label = label.item() if label.numel() == 1 else None
    if isinstance(label, bool) or not isinstance(label, int):
        raise InputTypeError(f"dataset: item {index} has label {item[1]!r}; expected an int class index")
    return item[0], label


def dataset_fingerprint(dataset: Any, count: int) -> dict:
    """The dataset's type, size and a hash of its first, middle and last examples and labels."""
    digest = hashlib.sha256()
    for index in sorted({0, count // 2, count - 1}):
        x, label = _example(dataset, index)
        digest.update(_digest_tensor(x).encode() + str(label).encode())
    return {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}", "size": count,
            "sampled": digest.hexdigest()}


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_folder(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _file_name(kind: str, key: str, keys: Sequence[str]) -> str:
    return f"{kind}.npy" if key == "" else f"{kind}__{keys.index(key)}.npy"


def _write_json_atomic(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _write_synced(partial, lambda handle: handle.write(json.dumps(data, indent=1, sort_keys=True).encode()))
    os.replace(partial, path)
    _sync_folder(path.parent)


# --------------------------------------------------------------------------------------------- run
@dataclass
class DatasetRun:
    """A run's folder, read back: the manifest and every shard's arrays, memory-mapped.

    >>> run = load_run("runs/digits")
    >>> run.array("output").shape, run.keys         # (N,); the maps' names (layers, or 'input')
    >>> run.array("delta", "features.7")            # (N,) completeness per example at that layer
    """

    folder: Path
    manifest: dict
    seconds: float = 0.0
    computed: list[int] = field(default_factory=list)  # shards this process computed in this call
    skipped: list[int] = field(default_factory=list)  # shards this process found complete on disk

    @property
    def keys(self) -> list[str]:
        return list(self.manifest["keys"])

    @property
    def shards(self) -> int:
        return int(self.manifest["shards"])

    def shard_folder(self, shard: int) -> Path:
        return self.folder / "shards" / f"{shard:05d}"

    def shard_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """One shard's arrays by name (``filters__0``, ``target``, ...), memory-mapped."""
        folder = self.shard_folder(shard)
        return {path.stem: np.load(path, mmap_mode="r", allow_pickle=False) for path in sorted(folder.glob("*.npy"))}

    def array(self, kind: str, key: str = "") -> np.ndarray:
        """One array over every example, in index order (``kind``: index, label, target, output,
        baseline_output; or map, filters, delta with ``key`` a map's name)."""
        if key and key not in self.keys:
            raise InputError(f"key: {key!r} is not a map of this run; its maps are {', '.join(self.keys)}")
        name = _file_name(kind, key, self.keys)
        parts = []
        for shard in range(self.shards):
            path = self.shard_folder(shard) / name
            if not path.exists():
                raise InputError(f"{kind}: shard {shard:05d} has no {name} (the run is not complete, or did not store it)")
            parts.append(np.load(path, mmap_mode="r", allow_pickle=False))
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])


def load_run(folder: str | Path) -> DatasetRun:
    """A finished run's folder (every shard verified against its checksums)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise InputError(f"folder: {folder} has no {MANIFEST}; it is not the folder of an attrib run")
    run = DatasetRun(folder, manifest)
    config = manifest["config"]
    ranges = shard_indices(int(config["count"]), int(config["shard_size"]))
    if not manifest.get("complete") or run.shards != len(ranges):
        raise InputError(f"folder: the run in {folder} is not finished; rerun the same command to finish it")
    for shard in range(run.shards):
        if not _verified(run.shard_folder(shard), manifest["config_hash"], shard, len(ranges[shard]), run.keys):
            raise InputError(f"folder: shard {shard:05d} is missing; rerun the same command to compute it")
    return run


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"out: {path} cannot be read as an attrib manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL:
        raise InputError(f"out: {path} was not written by {TOOL}; choose another folder")
    config = manifest.get("config")
    if (not isinstance(config, dict) or manifest.get("config_hash") != _config_hash(config)
            or not isinstance(manifest.get("keys"), list) or not isinstance(manifest.get("shards"), int)):
        raise InputError(f"out: {path} is damaged (its configuration does not match its hash, or a field is missing); "
                         "remove the folder and run again")
    return manifest


def _verified(folder: Path, config_hash: str, shard: int, rows: int, keys: list[str] | None = None) -> bool:
    """Whether the shard is complete on disk: False if absent; an error if corrupt or foreign."""
    if not folder.exists():
        return False
    corrupt = f"shard {shard:05d} ({folder})"
    try:
        meta = json.loads((folder / SHARD_META).read_text())
    except (OSError, ValueError):
        raise InputError(f"{corrupt} has no readable {SHARD_META}: it is corrupt; remove the folder and rerun to "
                         "recompute it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise InputError(f"{corrupt}: its {SHARD_META} is damaged; remove the folder and rerun to recompute it")
    if meta.get("config_hash") != config_hash or meta.get("shard") != shard:
        raise InputError(f"{corrupt} was written by another run (configuration {str(meta.get('config_hash'))[:12]}, shard "
                         f"{meta.get('shard')}); it does not belong here")
    files = meta["files"]
    present = {path.name for path in folder.glob("*.npy")}
    needed = {"index.npy", "label.npy", "target.npy"}
    if meta.get("rows") != rows or not needed <= set(files) or present != set(files) or (
            keys is not None and meta.get("keys") != keys):
        raise InputError(f"{corrupt}: its files, rows or maps are not what its {SHARD_META} and the run say (expected "
                         f"{rows} rows); remove the folder and rerun to recompute it")
    for name, digest in files.items():
        if _sha256(folder / name) != digest:
            raise InputError(f"{corrupt}: {name} does not match its checksum: the shard is corrupt; remove the folder "
                             "and rerun to recompute it")
    return True


def _check_out(out: Path) -> None:
    """``out`` is new, empty, or a run's folder (with its manifest): anything else is refused."""
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a folder")
    if out.is_dir() and not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise InputError(f"out: {out} is a folder with other files in it, not an attrib run; choose a new folder")


def _agreed(place: World, error: str | None) -> None:
    """Every rank learns whether any rank failed (one collective), and all raise the first failure: a refusal
    on one rank ends every rank with the same one line, none left waiting at a collective."""
    if place.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * place.size
        dist.all_gather_object(gathered, error)
        found = [(rank, text) for rank, text in enumerate(gathered) if text]
        if found:
            rank, text = found[0]
            raise InputError(text if rank == place.rank else f"{text} (on rank {rank})")
    if error:
        raise InputError(error)


def _prepare(out: Path, config: dict, place: World) -> dict:
    """The manifest, written by rank 0 if new; an old one must describe the same run."""
    config_hash = _config_hash(config)
    error = None
    try:
        _prepare_folder(out, config, config_hash, place)
    except InputError as refused:
        error = str(refused)
    _agreed(place, error)
    manifest = _read_manifest(out)
    assert manifest is not None  # written by rank 0
    if manifest["config_hash"] != config_hash:
        changed = [key for key in sorted(set(config) | set(manifest["config"]))
                   if config.get(key) != manifest["config"].get(key)]
        detail = _method_change(config, manifest["config"]) if changed == ["method"] else ", ".join(changed)
        raise InputError(f"out: {out} holds a run with another configuration ({detail} changed); its shards "
                         "cannot be mixed with this run's: choose a new folder, or remove that one")
    return manifest


def _method_change(new: dict, old: dict) -> str:
    """Which of the method's settings changed (``method.settings.layers``), or its class."""
    a, b = new["method"], old["method"]
    if a.get("class") != b.get("class"):
        return "method"
    keys = sorted(set(a.get("settings", {})) | set(b.get("settings", {})))
    return ", ".join(f"method.settings.{k}" for k in keys if a["settings"].get(k) != b["settings"].get(k)) or "method"


def _prepare_folder(out: Path, config: dict, config_hash: str, place: World) -> None:
    if place.rank == 0:
        _check_out(out)
        old = _read_manifest(out)
        if old is None:
            try:
                (out / "shards").mkdir(parents=True, exist_ok=True)
                _write_json_atomic(out / MANIFEST, {"tool": TOOL, "format": FORMAT, "config": config,
                                                    "config_hash": config_hash, "keys": [], "shards": 0})
            except OSError as error:
                raise InputError(f"out: cannot write in {out}: {error.strerror or error}") from None
        else:
            try:
                (out / "shards").mkdir(exist_ok=True)  # removed by hand: recreated
            except OSError as error:
                raise InputError(f"out: cannot write in {out}: {error.strerror or error}") from None


def _maps(result: Any) -> dict[str, Tensor]:
    """An Attribution's maps by name: each layer, or ``input`` (several inputs: ``input0``, ...)."""
    found = result.attributions
    if isinstance(found, dict):
        return {str(name): value for name, value in found.items()}
    if isinstance(found, tuple):
        return {f"input{i}": value for i, value in enumerate(found)}
    return {"input": found}


def _deltas(result: Any, keys: list[str]) -> dict[str, Tensor]:
    delta = getattr(result, "delta", None)
    if delta is None:
        return {}
    if isinstance(delta, dict):
        return {str(name): value for name, value in delta.items()}
    return {key: delta for key in keys}


def _filters(value: Tensor) -> Tensor:
    """Per example, per channel: the sum over every position (a (N, C) map is itself)."""
    value = value.detach()
    if value.dim() <= 2:
        return value.reshape(value.shape[0], -1).to(torch.float64)
    return value.reshape(value.shape[0], value.shape[1], -1).sum(-1, dtype=torch.float64)


class _Collected:
    """One shard's rows, gathered batch by batch."""

    def __init__(self) -> None:
        self.rows: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, value: Tensor | np.ndarray) -> None:
        array = value.detach().to("cpu").numpy() if isinstance(value, Tensor) else value
        self.rows.setdefault(name, []).append(np.ascontiguousarray(array))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.rows.items()}


@dataclass(frozen=True)
class Extras:
    """Per-example computations beside the method: ablation scores of every filter of
    ``ablation_layers`` (:func:`attrib.evaluate.ablation_scores`), and ``per_example`` callables
    ``(model, x, targets) -> {name: array}`` with a ``describe()`` for the manifest (for instance
    :class:`attrib.graphs.PathGraphRows`, each example's path graph). An array whose name ends in ``_row``
    holds row numbers within the batch (flat arrays of several entries per example); the run offsets them."""

    ablation_layers: tuple[str, ...] = ()
    ablation_mode: str = "zero"
    per_example: tuple = ()

    def describe(self) -> dict:
        return {"ablation_layers": list(self.ablation_layers), "ablation_mode": self.ablation_mode,
                "per_example": [_describe(extra.describe()) for extra in self.per_example]}


def _extras(model: nn.Module, x: Tensor, targets: Tensor, extras: Extras) -> dict[str, np.ndarray]:
    from .evaluate import ablation_scores

    rows: dict[str, np.ndarray] = {}
    for j, layer in enumerate(extras.ablation_layers):
        rows[f"ablation__{j}"] = ablation_scores(model, x, layer, targets.to(x.device), extras.ablation_mode).to("cpu").numpy()
    for extra in extras.per_example:
        found = extra(model, x, targets)
        clash = sorted(set(found) & set(rows))
        if clash:
            raise InputError(f"per_example: {type(extra).__name__} writes {clash[0]!r}, which another part writes too")
        rows.update(found)
    return rows


def _explain_batch(method: Any, x: Tensor, labels: Tensor, target_mode: str | int, kwargs: dict,
                   store_maps: bool, keys: list[str] | None, extras: Extras) -> tuple[dict[str, np.ndarray], list[str]]:
    model = _model_of(method)
    if target_mode == "label":
        targets = labels
    elif target_mode == "predicted":
        with torch.no_grad():
            targets = model(x).argmax(1).to("cpu")
    else:
        targets = torch.full_like(labels, int(target_mode))
    if bool((targets < 0).any()):
        raise InputError(f"target: class indices must be >= 0 (a run stores the class it explains); got "
                         f"{int(targets.min())}")
    result = method.attribute(x, target=targets.to(x.device), **kwargs)
    maps = _maps(result)
    names = list(maps)
    if keys is not None and names != keys:
        raise InputError(f"method: its maps changed between batches ({names} after {keys})")
    rows: dict[str, np.ndarray] = {"target": targets.numpy().astype(np.int64)}
    outputs = getattr(result, "outputs", None)
    if isinstance(outputs, Tensor):
        rows["output"] = outputs.detach().to("cpu").numpy()
    baseline = getattr(result, "baseline_outputs", None)
    if isinstance(baseline, Tensor):
        rows["baseline_output"] = baseline.detach().to("cpu").numpy()
    for key, value in maps.items():
        if store_maps:
            rows[_file_name("map", key, names)] = value.detach().to("cpu").numpy()
        rows[_file_name("filters", key, names)] = _filters(value).to("cpu").numpy()
    for key, value in _deltas(result, names).items():
        if key in names and isinstance(value, Tensor):
            rows[_file_name("delta", key, names)] = value.detach().to("cpu").numpy().reshape(-1)
    rows.update(_extras(model, x, targets, extras))
    return rows, names


def _write_shard(folder: Path, shard: int, arrays: dict[str, np.ndarray], keys: list[str], config_hash: str, rank: int,
                 threads: int) -> None:
    partial = folder.parent / f".{folder.name}.partial-{rank}-{os.getpid()}"
    partial.mkdir()
    try:
        files = {}
        for name, array in sorted(arrays.items()):
            path = partial / (name if name.endswith(".npy") else f"{name}.npy")
            _write_synced(path, lambda handle, a=array: np.save(handle, a, allow_pickle=False))
            files[path.name] = _sha256(path)
        meta = {"tool": TOOL, "shard": shard, "config_hash": config_hash, "files": files, "rows": int(len(arrays["index"])),
                "keys": keys, "rank": rank, "threads": threads}
        _write_synced(partial / SHARD_META, lambda handle: handle.write(json.dumps(meta, indent=1, sort_keys=True).encode()))
        _sync_folder(partial)
        os.rename(partial, folder)
        _sync_folder(folder.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _remove_partials(shards_folder: Path, mine: set[int]) -> None:
    """The hidden folders a killed run left for this rank's shards (this tool's names only)."""
    import re

    for path in shards_folder.glob(".*.partial-*"):
        match = re.fullmatch(r"\.(\d{5})\.partial-(\d+)-(\d+)", path.name)
        if match and int(match.group(1)) in mine and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


class _Progress:
    """A tqdm bar per rank; rank 0's counts every rank's examples (through the process group's store)."""

    def __init__(self, place: World, total: int, mine: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.place, self.store = place, None
        if place.distributed:
            try:
                import torch.distributed as dist

                self.store = dist.PrefixStore("attrib_run_progress", dist.distributed_c10d._get_default_store())
            except (AttributeError, RuntimeError):  # a torch without the default store: rank 0 counts its own
                self.store = None
        label = "all ranks" if place.rank == 0 and self.store is not None else f"rank {place.rank}"
        shown = total if place.rank == 0 and self.store is not None else mine
        self.bar = tqdm(total=shown, desc=f"attrib run ({label})", unit="example", position=place.rank,
                        disable=not enabled, leave=place.rank == 0, dynamic_ncols=True)

    def done(self, count: int) -> None:
        if self.store is not None:
            total = self.store.add("done", count)
            if self.place.rank == 0:
                self.bar.n = total
                self.bar.refresh()
                return
        self.bar.update(count)

    def close(self) -> None:
        if self.store is not None and self.place.rank == 0:
            self.bar.n = int(self.store.add("done", 0))
            self.bar.refresh()
        self.bar.close()


def run_dataset(
    method: Any,
    dataset: Any,
    out: str | Path,
    *,
    target: str | int = "label",
    batch_size: int = 32,
    num_workers: int = 0,
    shard_size: int = 256,
    maps: bool = True,
    attribute_kwargs: dict | None = None,
    limit: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    ablation_layers: Sequence[str] = (),
    per_example: Sequence[Any] = (),
    top_k: int = 5,
    summary: bool = True,
    summary_page: Any = None,
) -> DatasetRun:
    """Explain every example of ``dataset`` with ``method`` (any attrib method object: conductance of
    many layers, integrated gradients, LRP, ...), writing shards to ``out``; see the module's text.

    ``target``: ``"label"`` (the dataset's), ``"predicted"`` or a class index. ``attribute_kwargs``: passed
    to ``method.attribute`` for every batch (``n_steps``, ``baselines``, ``memory_budget``, ...).
    ``maps=False`` stores per-channel sums and deltas only. ``limit``: the first ``limit`` examples.
    ``device``: where the inputs go (default: the model's; under ``torchrun`` with CUDA, ``cuda:LOCAL_RANK``,
    where the model is moved). ``ablation_layers``: also store, per example, the ablation score of every
    filter of these layers (for the ablation-agreement statistics); ``per_example``: more per-example
    parts (:class:`Extras`), e.g. ``[attrib.graphs.PathGraphRows(k=4)]`` for the class-level path graphs.
    ``summary``: after every shard is done, the per-class aggregates (``top_k`` filters per example
    counted), merged across ranks, written by rank 0 (:mod:`attrib.dataset_summary`);
    ``summary_page(folder, manifest, aggregates, merged)`` adds figures and a page to it (the CLI passes
    :func:`attrib.viz.dataset.write_summary_page`). Returns this process's :class:`DatasetRun`, after every
    rank finished.
    """
    started = time.perf_counter()
    out = Path(out)
    kwargs = dict(attribute_kwargs or {})
    for name in ("target", "inputs"):
        if name in kwargs:
            raise InputError(f"attribute_kwargs: {name!r} is set by the run (target=...); remove it")
    if not (isinstance(target, int) and not isinstance(target, bool)) and target not in TARGETS:
        raise InputError(f"target must be 'label', 'predicted' or a class index, got {target!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise InputTypeError(f"dataset: expected a map-style dataset (len and [i]), got {type(dataset).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(maps, bool):
        raise InputTypeError(f"maps must be True or False, got {maps!r}")
    if isinstance(target, int) and not isinstance(target, bool) and target < 0:
        raise InputError(f"target must be a class index >= 0, 'label' or 'predicted', got {target!r}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count < 1:
        raise InputError("dataset: it has no examples")
    model = _model_of(method)
    extras = _check_extras(model, ablation_layers, per_example, top_k)
    param = next(iter(model.parameters()), None)
    model_device = param.device if param is not None else torch.device("cpu")
    place = world(torch.device(device) if device is not None else model_device)
    if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = torch.device("cuda", place.local_rank)  # one GPU per local rank
    if device is None and model_device.type == "cuda" and place.distributed:
        device = torch.device("cuda", place.local_rank)
    device = torch.device(device) if device is not None else model_device
    if device != model_device:
        model.to(device)  # the model goes where the inputs go
    threads = torch.get_num_threads()
    try:
        config = {
            "model": model_fingerprint(model), "method": method_description(method),
            "attribute_kwargs": _describe(kwargs), "dataset": dataset_fingerprint(dataset, count), "count": count,
            "target": target, "batch_size": batch_size, "shard_size": shard_size, "maps": bool(maps),
            "extras": extras.describe(), "threads": threads,
        }
        manifest = _prepare(out, config, place)
        config_hash = manifest["config_hash"]
        ranges = shard_indices(count, shard_size)
        mine = shards_of(place.rank, place.size, len(ranges))
        shards_folder = out / "shards"
        _remove_partials(shards_folder, set(mine))
        run = DatasetRun(out, manifest)
        todo: list[int] = []
        error = None
        try:
            for shard in mine:
                done = _verified(shards_folder / f"{shard:05d}", config_hash, shard, len(ranges[shard]))
                (run.skipped if done else todo).append(shard)
        except InputError as refused:
            error = str(refused)
        _agreed(place, error)
        bar = _Progress(place, count, sum(len(ranges[s]) for s in mine), progress)
        try:
            bar.done(sum(len(ranges[s]) for s in run.skipped))
            keys, error = None, None
            try:
                keys = _compute(method, dataset, ranges, todo, shards_folder, config_hash, place, threads, device, target,
                                kwargs, maps, batch_size, num_workers, bar, extras)
            except InputError as refused:
                error = str(refused)
            _agreed(place, error)
            run.computed = todo
            _finish(out, place, keys, len(ranges))  # every rank done: rank 0's bar shows the total
        finally:
            bar.close()
        run.manifest = _read_manifest(out) or manifest
        if summary:
            from .dataset_summary import summarise

            summarise(run, place, mine, top_k, summary_page)
        run.seconds = time.perf_counter() - started
        return run
    finally:
        if place.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _check_extras(model: nn.Module, ablation_layers: Sequence[str], per_example: Sequence[Any], top_k: int) -> Extras:
    from .hooks import resolve_layers

    if isinstance(ablation_layers, str):
        ablation_layers = [ablation_layers]
    layers = tuple(name for name, _ in resolve_layers(model, list(ablation_layers), argument="ablation_layers")) \
        if ablation_layers else ()
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a positive int, got {top_k!r}")
    for extra in per_example:
        if not (callable(extra) and callable(getattr(extra, "describe", None))):
            raise InputTypeError(f"per_example: {type(extra).__name__} is not callable with a describe() method")
    return Extras(layers, "zero", tuple(per_example))


def _compute(method, dataset, ranges, todo, shards_folder, config_hash, place, threads, device, target, kwargs, maps,
             batch_size, num_workers, bar, extras: Extras) -> list[str] | None:
    """Every shard in ``todo``, written as it completes; the maps' names (None if nothing was computed)."""
    keys: list[str] | None = None
    for shard in todo:
        # methods that draw noise (NoiseTunnel, GradientShap) draw the same numbers whichever rank computes the shard,
        # and resume to the same bits: the shard's own seed, the caller's random state restored after
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(config_hash[:12], 16) + shard)
            keys = _compute_shard(method, dataset, ranges, shard, shards_folder, config_hash, place, threads, device,
                                  target, kwargs, maps, batch_size, num_workers, bar, extras, keys)
    return keys


def _compute_shard(method, dataset, ranges, shard, shards_folder, config_hash, place, threads, device, target, kwargs,
                   maps, batch_size, num_workers, bar, extras: Extras, keys: list[str] | None) -> list[str] | None:
    from torch.utils.data import DataLoader, Subset

    indices = list(ranges[shard])
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    collected = _Collected()
    position = 0
    for x, labels in _unwrapped(loader):
        rows, keys = _explain_batch(method, x.to(device), labels, target, kwargs, maps, keys, extras)
        collected.add("index", np.asarray(indices[position:position + len(labels)], dtype=np.int64))
        collected.add("label", labels.numpy().astype(np.int64))
        for name, value in rows.items():
            collected.add(name, value + position if name.endswith("_row") else value)
        position += len(labels)
        bar.done(len(labels))
    assert keys is not None  # a shard has at least one example
    _write_shard(shards_folder / f"{shard:05d}", shard, collected.arrays(), keys, config_hash, place.rank, threads)
    return keys


def _unwrapped(loader) -> Iterator:
    """The loader's batches; an InputError raised in a worker process keeps its own one line."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except InputError as error:
            text = str(error)
            if "DataLoader worker" in text and "InputError: " in text:
                raise InputError(text.rsplit("InputError: ", 1)[1].strip()) from None
            raise
        yield batch


def _label(value: Any) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"dataset: a label is {value!r}; labels must be int class indices")
    return int(value)


def _collate(batch: list) -> tuple[Tensor, Tensor]:
    inputs, labels = [], []
    for item in batch:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor)):
            raise InputTypeError(f"dataset: an item is {type(item).__name__}; expected (input tensor, label)")
        inputs.append(item[0])
        labels.append(_label(item[1]))
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) > 1:
        raise InputError(f"dataset: examples of different shapes in one batch ({sorted(shapes)[:2]}); resize them to one "
                         "size (a transform), or use batch_size=1")
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.long)


def _finish(out: Path, place: World, keys: list[str] | None, shards: int) -> None:
    """After every rank: rank 0 records the maps' names and the shard count in the manifest."""
    if place.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * place.size
        dist.all_gather_object(gathered, keys)
        keys = next((k for k in gathered if k is not None), None)
    if place.rank == 0:
        manifest = _read_manifest(out)
        assert manifest is not None
        if keys is None:  # nothing computed in this call: the shards say
            meta = json.loads((out / "shards" / f"{0:05d}" / SHARD_META).read_text())
            keys = list(meta.get("keys") or [])
        if manifest.get("keys") and keys and manifest["keys"] != keys:
            raise InputError(f"method: its maps are {keys}, but the run's earlier shards have {manifest['keys']}")
        manifest.update(keys=keys, shards=shards, complete=True)
        _write_json_atomic(out / MANIFEST, manifest)
    _barrier(place)
