"""Trace shards + manifest: round trip, atomic resume, and a clear error for every kind of damage.
"""

import json

import numpy as np
import pytest

from megacontext.traces import (
    ENTRY_KEYS,
    MANIFEST,
    SNAPSHOT_KEYS,
    TraceFormatError,
    TraceReader,
    TraceWriter,
)
from tests.strategies import random_snapshot, write_random_traces


def test_round_trip(tmp_path):
    snaps = write_random_traces(tmp_path / "t", n_snapshots=10, shard_size=4)
    r = TraceReader(tmp_path / "t", require_complete=True)
    assert len(r) == 10 and len(list((tmp_path / "t").glob("shard-*"))) == 3
    for i, s in enumerate(snaps):
        got = r[i]
        for k, (dtype, _) in {**ENTRY_KEYS, **SNAPSHOT_KEYS}.items():
            np.testing.assert_array_equal(got[k], np.asarray(s[k]).astype(dtype), err_msg=k)
    assert r[-1]["levels"].shape == snaps[-1]["levels"].shape
    with pytest.raises(IndexError):
        r[10]


def test_resume_after_crash_keeps_completed_shards(tmp_path):
    rng = np.random.default_rng(0)
    meta = {"d_model": 8, "n_tail": 3, "seed": 1}
    w = TraceWriter(tmp_path, meta, shard_size=2)
    snaps = [random_snapshot(rng, n=5, d_model=8) for _ in range(7)]
    for s in snaps[:5]:
        w.add(s)  # two shards on disk, one snapshot buffered: then the process "dies"
    (tmp_path / "shard-00002.safetensors.tmp").write_bytes(b"half")  # a half-written file
    (tmp_path / "shard-00002.safetensors").write_bytes(b"never listed")  # renamed, manifest not yet
    with pytest.raises(TraceFormatError, match="incomplete"):
        TraceReader(tmp_path, require_complete=True)
    w2 = TraceWriter(tmp_path, meta, shard_size=2)
    assert w2.n_done == 4
    for s in snaps[w2.n_done :]:
        w2.add(s)
    w2.close()
    r = TraceReader(tmp_path, require_complete=True)
    assert len(r) == 7 and not list(tmp_path.glob("*.tmp"))
    np.testing.assert_array_equal(r[6]["embeddings"], snaps[6]["embeddings"])
    with pytest.raises(TraceFormatError, match="different meta"):
        TraceWriter(tmp_path, {**meta, "seed": 2})


@pytest.mark.parametrize(
    "damage", ["truncate", "flip", "delete", "manifest_json", "schema", "no_manifest"]
)
def test_damage_is_reported_with_the_file(tmp_path, damage):
    write_random_traces(tmp_path, n_snapshots=6, shard_size=3)
    shard = tmp_path / "shard-00001.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    elif damage == "manifest_json":
        (tmp_path / MANIFEST).write_text("{not json")
    elif damage == "schema":
        doc = json.loads((tmp_path / MANIFEST).read_text())
        doc["schema_version"] = 99
        (tmp_path / MANIFEST).write_text(json.dumps(doc))
    else:
        (tmp_path / MANIFEST).unlink()
    with pytest.raises(TraceFormatError) as err:
        TraceReader(tmp_path)
    name = MANIFEST if damage in ("manifest_json", "schema", "no_manifest") else shard.name
    assert name in str(err.value)


def test_mismatched_shard_shapes_are_caught(tmp_path):
    write_random_traces(tmp_path, n_snapshots=3, shard_size=3, d_model=8)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    doc["meta"]["d_model"] = 16  # the shards hold width 8
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(TraceFormatError, match="embeddings has shape"):
        TraceReader(tmp_path)


def test_writer_rejects_bad_snapshots(tmp_path):
    w = TraceWriter(tmp_path, {"d_model": 8, "n_tail": 3})
    snap = random_snapshot(np.random.default_rng(0), n=4, d_model=8)
    with pytest.raises(ValueError, match="lacks keys"):
        w.add({k: v for k, v in snap.items() if k != "levels"})
    with pytest.raises(ValueError, match="embeddings"):
        w.add({**snap, "embeddings": np.zeros((4, 7))})


def test_several_directories_read_as_one_trace_in_order(tmp_path):
    a = write_random_traces(tmp_path / "a", n_snapshots=5, shard_size=2)
    b = write_random_traces(tmp_path / "b", n_snapshots=3, shard_size=2, seed=1)
    both = TraceReader([tmp_path / "a", tmp_path / "b"], require_complete=True)
    assert len(both) == 8 and both.path == tmp_path / "a"
    for i, s in enumerate(a + b):
        np.testing.assert_array_equal(both[i]["embeddings"], np.asarray(s["embeddings"]))
    with pytest.raises(TraceFormatError, match="no trace directory"):
        TraceReader([])
