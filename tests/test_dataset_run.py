"""Dataset-scale runs (``attrib.run_dataset`` / ``attrib run``): sharding without duplicates, shards that are
complete or absent, resuming after a killed rank to the same bits as an uninterrupted single-process run, and
refusing corrupt shards, foreign shards and a changed configuration. The multi-process runs use torchrun with
gloo on the CPU (2 processes, 1 thread each)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attrib import LayerConductance
from attrib.dataset_run import load_run, run_dataset, shard_indices, shards_of
from attrib.errors import InputError
from attrib.models import DigitsDataset, load_digits_model

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "digits", "--dataset", "digits", "--layers", "features.2,features.7", "--threads", "1", "--quiet"]


def _attrib(args: list[str], cwd: Path, processes: int = 1) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(launcher + ["-m", "attrib", "run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    run = load_run(folder)
    found = {kind: run.array(kind) for kind in ("index", "label", "target", "output", "baseline_output")}
    for key in run.keys:
        for kind in ("map", "filters", "delta"):
            found[f"{kind}:{key}"] = run.array(kind, key)
    return found


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name  # bit for bit


def test_shards_cover_every_index_once_whatever_the_number_of_processes():
    for count, size in [(1797, 256), (10, 3), (7, 7), (1, 5)]:
        ranges = shard_indices(count, size)
        for world in (1, 2, 3, 8):
            taken = [i for rank in range(world) for shard in shards_of(rank, world, len(ranges)) for i in ranges[shard]]
            assert sorted(taken) == list(range(count))  # disjoint, complete, no padding


def test_two_processes_under_torchrun_equal_one_process_bit_for_bit(tmp_path):
    args = COMMON + ["--limit", "120", "--shard-size", "25", "--n-steps", "8", "--ablation-layers", "features.7",
                     "--graph-k", "3"]
    one = _attrib(args + ["--out", "one"], tmp_path)
    code, stderr = _finished(one)
    assert code == 0, stderr
    two = _attrib(args + ["--out", "two"], tmp_path, processes=2)
    code, stderr = _finished(two)
    assert code == 0, stderr
    _same(_arrays(tmp_path / "one"), _arrays(tmp_path / "two"))
    # the per-class summary, merged across ranks in shard order: the same bytes
    for name in ["aggregates.json"] + [f"class_{c}.graphml" for c in range(10)]:
        assert (tmp_path / "one" / "summary" / name).read_bytes() == (tmp_path / "two" / "summary" / name).read_bytes(), name
    ranks = [json.loads((tmp_path / "two" / "shards" / f"{s:05d}" / "shard.json").read_text())["rank"] for s in range(5)]
    assert ranks == [0, 1, 0, 1, 0]
    # and the library's numbers: the first shard against LayerConductance on the same examples
    torch.set_num_threads(1)
    model, data = load_digits_model(), DigitsDataset()
    x = torch.stack([data[i][0] for i in range(25)])
    labels = torch.tensor([data[i][1] for i in range(25)])
    expected = LayerConductance(model, ["features.2", "features.7"]).attribute(x, target=labels, n_steps=8)
    run = load_run(tmp_path / "two")
    assert np.array_equal(run.array("map", "features.7")[:25], expected["features.7"].numpy())
    assert np.array_equal(run.array("delta", "features.2")[:25], expected.delta["features.2"].numpy())


def _worker_pids(rank: int) -> list[int]:
    """Processes running `attrib run` with this RANK (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"attrib" in command and b"run" in command and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
@pytest.mark.parametrize("killed", ["rank 1", "the whole job"])
def test_a_run_killed_midway_resumes_to_the_uninterrupted_results(tmp_path, killed):
    args = COMMON + ["--limit", "240", "--shard-size", "10", "--n-steps", "24"]
    reference = _attrib(args + ["--out", "reference"], tmp_path)
    code, stderr = _finished(reference)
    assert code == 0, stderr
    job = _attrib(args + ["--out", "killed"], tmp_path, processes=2)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline:  # rank 1 has finished a shard and is working on the next
        # pathlib's "*" also matches the hidden partial folders, whose shard.json may be half written
        done = [json.loads(p.read_text())["rank"] for p in shards.glob("*/shard.json")
                if not p.parent.name.startswith(".")] if shards.exists() else []
        if done.count(1) >= 2:
            break
        time.sleep(0.05)
    if killed == "rank 1":
        pids = _worker_pids(1)
        assert pids, "rank 1 was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    else:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and both ranks at once
    code, _ = _finished(job)
    assert code != 0  # torchrun reports the lost rank and stops the other, or was killed itself
    left = sorted(p.name for p in shards.iterdir() if not p.name.startswith("."))
    assert 0 < len(left) < 24  # some shards done, not all
    resumed = _attrib(args + ["--out", "killed"], tmp_path, processes=2)
    code, stderr = _finished(resumed)
    assert code == 0, stderr
    assert "found done" in stderr and not list(shards.glob(".*"))  # skipped the finished shards; no partial folders left
    _same(_arrays(tmp_path / "reference"), _arrays(tmp_path / "killed"))


def _small_run(folder: Path, n_steps: int = 4, limit: int = 30) -> None:
    torch.set_num_threads(1)
    run_dataset(LayerConductance(load_digits_model(), ["features.7"]), DigitsDataset(), folder, shard_size=10, limit=limit,
                attribute_kwargs={"n_steps": n_steps}, progress=False)


def test_corrupt_foreign_and_changed_runs_are_refused_naming_what(tmp_path):
    out = tmp_path / "run"
    _small_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _small_run(out)  # the same run again: every shard found done, nothing written
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(InputError, match=r"another configuration \(attribute_kwargs changed\)"):
        _small_run(out, n_steps=5)
    other = tmp_path / "other"
    _small_run(other, n_steps=5)
    target = out / "shards" / "00001"
    saved = target.rename(tmp_path / "saved")
    (other / "shards" / "00001").rename(target)  # a shard of another run, moved in
    with pytest.raises(InputError, match=r"shard 00001 .* was written by another run"):
        _small_run(out)
    import shutil

    shutil.rmtree(target)
    saved.rename(target)
    data = bytearray((target / "map__0.npy").read_bytes())
    data[-1] ^= 1  # one bit of one value
    (target / "map__0.npy").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"shard 00001 .*map__0.npy does not match its checksum"):
        _small_run(out)
    with pytest.raises(InputError, match=r"map__0.npy does not match its checksum"):
        load_run(out)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="other files in it, not an attrib run"):
        _small_run(stranger)
    assert (stranger / "notes.txt").read_text() == "mine" and len(list(stranger.iterdir())) == 1


def test_the_summary_is_the_dense_statistics_of_the_shards(tmp_path):
    """Per class: mean and std of every filter's conductance, top-k counts, ablation agreement and the class-level
    graph, against numpy on the stored arrays and against the library run directly on the examples."""
    from attrib import graphs
    from attrib.evaluate import ablation_scores, pearson, spearman
    from attrib.viz.dataset import write_summary_page

    torch.set_num_threads(1)
    model, data = load_digits_model(), DigitsDataset()
    out = tmp_path / "run"
    run = run_dataset(LayerConductance(model, ["features.2", "features.7"]), data, out, shard_size=20, limit=60,
                      attribute_kwargs={"n_steps": 8}, progress=False, ablation_layers=["features.7"],
                      per_example=[graphs.PathGraphRows(k=3)], top_k=4, summary_page=write_summary_page)
    summary = json.loads((out / "summary" / "aggregates.json").read_text())
    target = run.array("target")
    for key in run.keys:
        values = run.array("filters", key).astype(np.float64)
        for c in np.unique(target):
            found = summary["classes"][str(c)]
            rows = values[target == c]
            assert found["count"] == len(rows)
            layer = found["layers"][key]
            assert np.allclose(layer["mean"], rows.mean(0), rtol=1e-12, atol=1e-12)
            assert np.allclose(layer["std"], rows.std(0), rtol=1e-9, atol=1e-12)
            top = np.argsort(-rows, axis=1, kind="stable")[:, :4]
            assert layer["top_k_counts"] == np.bincount(top.reshape(-1), minlength=rows.shape[1]).tolist()
    c = int(target[0])
    members = [i for i in range(60) if int(target[i]) == c]
    x = torch.stack([data[i][0] for i in members])
    ablation = ablation_scores(model, x, "features.7", torch.tensor([c] * len(members)))
    ours = LayerConductance(model, ["features.7"]).attribute(x, target=c, n_steps=8)["features.7"].sum((2, 3))
    agreement = summary["classes"][str(c)]["ablation_agreement"]["features.7"]
    assert abs(agreement["pearson"]["mean"] - float(pearson(ours, ablation).mean())) < 1e-6
    assert abs(agreement["spearman"]["mean"] - float(spearman(ours, ablation).mean())) < 1e-6
    summed: dict = {}
    for i in members:  # the class-level graph: every example's edges, summed
        flow = graphs.build_graph(model, data[i][0][None], target=c, k=3, composite="epsilon_plus", conductance_steps=None)
        for source, end, attributes in flow.graph.edges(data=True):
            key = (graphs.node_id(source), graphs.node_id(end))
            summed[key] = summed.get(key, 0.0) + attributes["weight"]
    written = json.loads((out / "summary" / f"class_{c}.json").read_text())
    edges = {(e["source"], e["target"]): e["weight"] for e in written["edges"]}
    assert edges.keys() == summed.keys()
    assert max(abs(edges[k] - summed[k]) for k in summed) < 1e-5 * max(abs(v) for v in summed.values())
    assert (out / "summary" / "index.html").exists() and (out / "summary" / f"graph_{c}.png").exists()


def test_a_noisy_method_recomputes_a_lost_shard_to_the_same_bytes_and_leaves_the_callers_random_state(tmp_path):
    from attrib import IntegratedGradients, NoiseTunnel

    torch.set_num_threads(1)
    method = NoiseTunnel(IntegratedGradients(load_digits_model()))
    options = {"n_steps": 4, "nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.3}
    out = tmp_path / "noisy"
    torch.manual_seed(123)
    run_dataset(method, DigitsDataset(), out, shard_size=8, limit=24, attribute_kwargs=options, progress=False)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the run drew its noise from its own generator state
    first = (out / "shards" / "00001" / "map__0.npy").read_bytes()
    import shutil

    shutil.rmtree(out / "shards" / "00001")
    run = run_dataset(method, DigitsDataset(), out, shard_size=8, limit=24, attribute_kwargs=options, progress=False)
    assert run.computed == [1] and run.skipped == [0, 2]
    assert (out / "shards" / "00001" / "map__0.npy").read_bytes() == first  # the shard's own seed: the same noise


def test_dataloader_workers_give_the_same_shards(tmp_path):
    torch.set_num_threads(1)
    method = LayerConductance(load_digits_model(), ["features.7"])
    for workers in (0, 2):
        run_dataset(method, DigitsDataset(), tmp_path / f"w{workers}", shard_size=16, limit=32, num_workers=workers,
                    batch_size=8, attribute_kwargs={"n_steps": 4}, progress=False, summary=False)
    _same(_arrays(tmp_path / "w0"), _arrays(tmp_path / "w2"))


def test_an_image_folder_is_read_as_explain_reads_its_files(tmp_path):
    from PIL import Image

    from attrib.cli import main
    from attrib.cli_inputs import load_model, load_pictures
    from attrib.cli_run import FolderDataset

    rng = np.random.default_rng(0)
    files = []
    for label, mode, size in (("cats", "L", (20, 20)), ("cats", "RGBA", (40, 30)), ("dogs", "RGB", (32, 32)),
                              ("dogs", "I;16", (33, 33))):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        path = tmp_path / "data" / label / f"{mode.replace(';', '')}.png"
        array = rng.integers(0, 65535 if mode == "I;16" else 255, size=size[::-1] + ((4,) if mode == "RGBA" else (3,) if mode == "RGB" else ()))
        image = Image.fromarray(array.astype(np.uint16 if mode == "I;16" else np.uint8))
        assert image.mode == mode
        image.save(path)
        files.append(path)
    loaded = load_model("digits")
    data = FolderDataset(tmp_path / "data", loaded)
    assert data.classes == ["cats", "dogs"] and [label for _, label in data.files] == [0, 0, 1, 1]
    for i, (path, _) in enumerate(data.files):  # the same tensors as `attrib explain FILE` builds
        assert torch.equal(data[i][0], load_pictures([str(path)], loaded)[0].tensor[0])
    assert main(["run", "--dataset", str(tmp_path / "data"), "--layers", "features.7", "--n-steps", "4", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    assert run.array("label").tolist() == [0, 0, 1, 1] and run.array("filters", "features.7").shape == (4, 32)


class _Interrupted(DigitsDataset):
    fail = True

    def __getitem__(self, index):
        if index == 12 and self.fail:
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_unfinished_edited_or_tampered_runs_are_refused_and_user_folders_are_kept(tmp_path):
    torch.set_num_threads(1)
    method = LayerConductance(load_digits_model(), ["features.7"])
    out = tmp_path / "run"
    data = _Interrupted()
    with pytest.raises(KeyboardInterrupt):
        run_dataset(method, data, out, shard_size=10, limit=30, attribute_kwargs={"n_steps": 2}, progress=False)
    data.fail = False
    with pytest.raises(InputError, match="is not finished"):
        load_run(out)  # shard 00000 is done, the rest is not
    keep = out / "shards" / ".00001.partial-backup"  # not a name attrib writes
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    import shutil

    shutil.rmtree(out / "shards" / "00000")
    (out / "shards").rename(tmp_path / "moved")  # the shards folder removed by hand
    (tmp_path / "moved").rename(tmp_path / "elsewhere")
    run = run_dataset(method, data, out, shard_size=10, limit=30, attribute_kwargs={"n_steps": 2}, progress=False)
    assert run.computed == [0, 1, 2] and load_run(out).array("index").tolist() == list(range(30))
    assert (tmp_path / "elsewhere" / ".00001.partial-backup" / "precious.txt").read_text() == "mine"
    (out / "shards" / ".00001.partial-backup").mkdir()
    (out / "shards" / ".00001.partial-backup" / "precious.txt").write_text("mine")
    run_dataset(method, data, out, shard_size=10, limit=30, attribute_kwargs={"n_steps": 2}, progress=False)
    assert (out / "shards" / ".00001.partial-backup" / "precious.txt").read_text() == "mine"
    np.save(out / "shards" / "00002" / "extra.npy", np.zeros(3))  # a file the shard did not list
    with pytest.raises(InputError, match="shard 00002 .*files, rows or maps are not what"):
        load_run(out)
    (out / "shards" / "00002" / "extra.npy").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["count"] = 20  # edited by hand: no longer its hash
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="is damaged"):
        load_run(out)
    with pytest.raises(InputError, match="class indices must be >= 0|target must be a class index >= 0"):
        run_dataset(method, DigitsDataset(), tmp_path / "negative", target=-1, limit=4, progress=False)
