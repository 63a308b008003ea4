"""Stage 4's packed token cache: built once, reused, rebuilt when the token files change or it is
damaged, and the memory-mapped store gives exactly the batches the in-memory store gave."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import SCRIPTS, TINY, load, results, write_dataset, write_tokens
from pipeline import token_cache, train_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_files(root, artist="A"):
    folder = token_cache.cache_folder(root, artist)
    return folder / token_cache.CODES_FILE, folder / token_cache.INDEX_FILE


def counted_reads(monkeypatch) -> list:
    """Every token file train_data reads from now on (the cache reads them through it)."""
    reads, real_load = [], train_data.load_token_file
    monkeypatch.setattr(train_data, "load_token_file", lambda path: reads.append(path) or real_load(path))
    return reads


def old_way(root, artists):
    """The store built as before the cache: every token file read into one in-memory array."""
    entries, labels, _ = train_data.read_artist_manifests(root, artists)
    return train_data.load_dataset(entries, entry_labels=labels if len(artists) > 1 else None)


def test_the_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    write_dataset(tmp_path, lengths=(70, 64, 40))
    reads = counted_reads(monkeypatch)
    first, _ = train_data.load_artists(tmp_path, ["A"])
    codes_path, index_path = cache_files(tmp_path)
    stamps = (codes_path.stat().st_mtime_ns, index_path.stat().st_mtime_ns)
    assert len(reads) == 3 and isinstance(first.store.codes, np.memmap)
    again, _ = train_data.load_artists(tmp_path, ["A"])
    assert len(reads) == 3, "a second load read the token files again"
    assert (codes_path.stat().st_mtime_ns, index_path.stat().st_mtime_ns) == stamps
    assert not again.store.codes.flags.writeable and again.store.lengths.tolist() == [70, 64, 40]
    assert not list(tmp_path.glob("encoded_tokens/A/*.npy")), "the cache must stay out of the token listing"


def edit_changed_file(root):
    os.utime(root / "encoded_tokens/A/clip_1.th", ns=(1, 1))  # same bytes, another mtime


def edit_rewritten_file(root):
    write_tokens(root, "encoded_tokens/A/clip_1.th", 50, q=4, seed=9)


def edit_added_file(root):
    write_dataset(root, lengths=(70, 64, 40, 33))


def edit_removed_file(root):
    manifest = root / "metadata_clean_A.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))


@pytest.mark.parametrize("edit", [edit_changed_file, edit_rewritten_file, edit_added_file, edit_removed_file])
def test_the_cache_is_rebuilt_when_a_token_file_changes_is_added_or_removed(tmp_path, monkeypatch, edit):
    write_dataset(tmp_path, lengths=(70, 64, 40))
    train_data.load_artists(tmp_path, ["A"])
    edit(tmp_path)
    reads = counted_reads(monkeypatch)
    data, _ = train_data.load_artists(tmp_path, ["A"])
    assert reads, "the cache was trusted after the token files changed"
    expected = old_way(tmp_path, ["A"]).store
    assert data.store.lengths.tolist() == expected.lengths.tolist()
    np.testing.assert_array_equal(np.asarray(data.store.codes), expected.codes)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def garble(path):
    path.write_bytes(b"\x93NUMPY garbage" + path.read_bytes()[14:])


def corrupt_index(path):
    path.write_text(path.read_text()[:40])


@pytest.mark.parametrize("damage, target", [(truncate, 0), (garble, 0), (corrupt_index, 1), (truncate, 1)])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, damage, target):
    write_dataset(tmp_path, lengths=(70, 64, 40))
    train_data.load_artists(tmp_path, ["A"])
    damage(cache_files(tmp_path)[target])
    reads = counted_reads(monkeypatch)
    data, _ = train_data.load_artists(tmp_path, ["A"])
    assert len(reads) == 3
    assert "cannot be trusted" in caplog.text
    np.testing.assert_array_equal(np.asarray(data.store.codes), old_way(tmp_path, ["A"]).store.codes)


def test_a_cache_without_its_index_is_rebuilt(tmp_path, monkeypatch):
    write_dataset(tmp_path, lengths=(70, 64, 40))
    train_data.load_artists(tmp_path, ["A"])
    cache_files(tmp_path)[1].unlink()
    reads = counted_reads(monkeypatch)
    train_data.load_artists(tmp_path, ["A"])
    assert len(reads) == 3


@pytest.mark.parametrize("artists", [["A"], ["A", "B"]])
def test_the_mapped_store_gives_the_batches_of_the_in_memory_store(tmp_path, artists):
    write_dataset(tmp_path, "A", lengths=(100, 70, 50))
    write_dataset(tmp_path, "B", lengths=(30, 90, 40))
    (tmp_path / "encoded_tokens/B/clip_1.th").write_bytes(b"not a torch file")  # named and skipped
    mapped, _ = train_data.load_artists(tmp_path, artists)
    memory = old_way(tmp_path, artists)
    assert len(mapped.skipped) == len(artists) - 1
    for field in ("offsets", "lengths", "splits", "names", "labels"):
        assert np.array_equal(np.asarray(getattr(mapped.store, field)), np.asarray(getattr(memory.store, field)))
    assert mapped.token_contract == memory.token_contract and mapped.skipped == memory.skipped
    train = memory.store.clips("train")
    for epoch in range(2):
        windows = train_data.epoch_windows(mapped.store, train, 32, seed=3, epoch=epoch)
        assert np.array_equal(windows, train_data.epoch_windows(memory.store, train, 32, seed=3, epoch=epoch))
        for pattern in ("delay", "parallel"):
            got = train_data.make_batch(mapped.store, windows, 32, pattern, 0.1, np.random.default_rng(epoch))
            want = train_data.make_batch(memory.store, windows, 32, pattern, 0.1, np.random.default_rng(epoch))
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    for clip in range(len(memory.store.lengths)):
        assert np.array_equal(mapped.store.clip_codes(clip), memory.store.clip_codes(clip))


def test_a_joint_model_reuses_each_artists_own_cache(tmp_path, monkeypatch):
    write_dataset(tmp_path, "A", lengths=(100, 70, 50))
    write_dataset(tmp_path, "B", lengths=(30, 90))
    train_data.load_artists(tmp_path, ["A"])
    train_data.load_artists(tmp_path, ["B"])
    reads = counted_reads(monkeypatch)
    data, _ = train_data.load_artists(tmp_path, ["A", "B"])
    assert reads == [] and data.store.labels.tolist() == [0, 0, 0, 1, 1]


def test_waiting_processes_map_the_cache_the_first_one_packed(tmp_path):
    write_dataset(tmp_path, lengths=(70, 64, 40))
    code = ("import logging, sys; sys.path.insert(0, {scripts!r}); from pathlib import Path; "
            "logging.basicConfig(level=logging.INFO); "
            "from pipeline import train_data; data, _ = train_data.load_artists(Path({root!r}), ['A']); "
            "print(int(data.store.lengths.sum()))")
    command = [sys.executable, "-c", code.format(scripts=str(SCRIPTS), root=str(tmp_path))]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [out.strip() for out, _ in outputs] == ["174"] * 3, outputs
    assert sum("packed 3 token files" in err for _, err in outputs) == 1, [err for _, err in outputs]


# ---- two torchrun agents (two "nodes" on this machine) train the one-process model -------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def two_node_run(root, *extra) -> None:
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=two-nodes-{port}",
               str(SCRIPTS / "4_Transformer.py"), "--artist", "A", "--root", str(root), *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)


@pytest.mark.slow
def test_two_torchrun_agents_train_the_model_of_one_process_with_the_same_global_batch(stage4, tmp_path):
    """Two agents rendezvous over c10d on localhost (a two-node run on one machine); each rank trains
    batches of 2, so the global batch is 4: one process with --batch-size 4 must reach the same weights."""
    for name in ("nodes", "single"):
        write_dataset(tmp_path / name, lengths=(128, 128, 96, 60))  # 5 + 5 + 4 = 14 full training windows of 32
    no_randomness = ["--dropout", "0", "--frame-dropout", "0"]  # a rank's random draws are not one process's
    two_node_run(tmp_path / "nodes", "--epochs", "2", *no_randomness)  # TINY: --batch-size 2 on each rank
    assert stage4.main(["--artist", "A", "--root", tmp_path / "single", *TINY, "--epochs", "2", *no_randomness,
                        "--batch-size", "4"]) == 0
    nodes, single = load(results(tmp_path / "nodes") / "last.pt"), load(results(tmp_path / "single") / "last.pt")
    assert nodes["step"] == single["step"] == 2 * 4  # 14 windows: 4 global batches of 4 (the last of 2)
    assert nodes["model"].keys() == single["model"].keys()
    for key, weight in single["model"].items():  # summed in another order across ranks: equal to rounding
        torch.testing.assert_close(nodes["model"][key], weight, rtol=1e-4, atol=1e-5, msg=key)
    assert json.dumps(nodes["token_contract"], sort_keys=True) == json.dumps(single["token_contract"], sort_keys=True)
