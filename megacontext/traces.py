"""Trace logs on disk: labelled snapshots in safetensors shards plus a JSON manifest.

Layout of a trace directory::

    manifest.json          format, schema_version, d_model, n_tail_gists, tree shape, config,
    oracle,
                           seed, shards [{file, n_snapshots, sha256}], n_snapshots, complete
    shard-00000.safetensors

A shard holds S snapshots. Per-entry arrays (``ENTRY_KEYS``) are concatenated over its snapshots
with ``offsets`` (S+1) marking where each starts; per-snapshot arrays (``SNAPSHOT_KEYS``) are
stacked. Booleans are stored as uint8. Every file is written to a temporary name and renamed, the
manifest last, so a crash leaves only complete shards listed; ``TraceWriter`` resumes from them.
``TraceReader`` validates everything and raises ``TraceFormatError`` naming the offending file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

FORMAT = "megafocus-traces"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# name -> (dtype, trailing shape: "d" = d_model, "t" = n_tail_gists)
ENTRY_KEYS: dict[str, tuple[type, tuple[str, ...]]] = {
    "embeddings": (np.float32, ("d",)),
    "levels": (np.int64, ()),
    "node_index": (np.int64, ()),
    "span_start": (np.int64, ()),
    "span_width": (np.int64, ()),
    "distance_to_cursor": (np.int64, ()),
    "position_ids": (np.int64, ()),
    "can_expand": (np.bool_, ()),
    "can_collapse": (np.bool_, ()),
    "group_id": (np.int64, ()),
    "expand_cost": (np.float32, ()),
    "collapse_refund": (np.float32, ()),
    "expand_gain": (np.float32, ()),
    "collapse_cost": (np.float32, ()),
    "target_utilities": (np.float32, ()),
    "action_mask": (np.bool_, ()),
}
FEATURE_KEY = "entry_features"
"""Optional per-entry array (N, f): extra features a LensNet may read (``LensNetConfig.
n_entry_features``); present exactly when the manifest's meta has ``n_entry_features`` f > 0."""
SNAPSHOT_KEYS: dict[str, tuple[type, tuple[str, ...]]] = {
    "tail_gists": (np.float32, ("t", "d")),
    "tail_levels": (np.int64, ("t",)),
    "tail_mask": (np.bool_, ("t",)),
    "n_tokens": (np.int64, ()),
    "baseline_nll": (np.float32, ()),
    "doc_id": (np.int64, ()),
}


class TraceFormatError(ValueError):
    """A trace directory or shard is missing, corrupt, truncated or inconsistent."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shape(
    spec: tuple[str, ...], d_model: int, n_tail_gists: int, n_features: int = 0
) -> tuple[int, ...]:
    return tuple({"d": d_model, "t": n_tail_gists, "f": n_features}[s] for s in spec)


def entry_keys(meta: dict[str, Any]) -> dict[str, tuple[type, tuple[str, ...]]]:
    """The per-entry arrays of a trace with this ``meta``: ``ENTRY_KEYS``, plus ``FEATURE_KEY``
    (N, f) when ``meta['n_entry_features']`` f > 0."""
    if int(meta.get("n_entry_features", 0)) > 0:
        return {**ENTRY_KEYS, FEATURE_KEY: (np.float32, ("f",))}
    return ENTRY_KEYS


class TraceWriter:
    """Appends snapshots to a trace directory, one shard per ``shard_size``; resumable.

    ``meta`` must hold ``d_model`` and ``n_tail_gists`` (and should hold config, oracle, seed).
    Reopening
    a directory with the same meta resumes after its completed shards (``n_done``); different meta
    is refused rather than mixed.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], shard_size: int = 256) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        for key in ("d_model", "n_tail"):
            if key not in meta:
                raise ValueError(f"meta must contain {key!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.meta = json.loads(json.dumps(meta))  # JSON-normalised, so comparisons are exact
        self._buffer: list[dict[str, np.ndarray]] = []
        manifest = self.path / MANIFEST
        if manifest.exists():
            old = TraceReader.read_manifest(self.path)
            if old["meta"] != self.meta:
                raise TraceFormatError(
                    f"{manifest}: exists with different meta; use a new directory"
                )
            self.shards = old["shards"]
        else:
            self.shards = []
        for stray in self.path.glob("*.tmp"):  # half-written files from a crash
            stray.unlink()
        listed = {s["file"] for s in self.shards}
        for orphan in self.path.glob("shard-*.safetensors"):  # written but never listed
            if orphan.name not in listed:
                orphan.unlink()
        self._write_manifest(complete=False)

    @property
    def n_done(self) -> int:
        """Snapshots safely on disk (a resumed generator skips this many)."""
        return sum(s["n_snapshots"] for s in self.shards)

    def add(self, snapshot: dict[str, np.ndarray]) -> None:
        """Buffer one snapshot (keys ``ENTRY_KEYS`` (N, ...) and ``SNAPSHOT_KEYS``); flush when
        full."""
        d, t = self.meta["d_model"], self.meta["n_tail"]
        f = int(self.meta.get("n_entry_features", 0))
        keys = entry_keys(self.meta)
        missing = [k for k in (*keys, *SNAPSHOT_KEYS) if k not in snapshot]
        if missing:
            raise ValueError(f"snapshot lacks keys {missing}")
        n = np.asarray(snapshot["levels"]).shape[0]
        for k, (_, spec) in keys.items():
            if np.asarray(snapshot[k]).shape != (n, *_shape(spec, d, t, f)):
                raise ValueError(
                    f"snapshot[{k!r}] has shape {np.shape(snapshot[k])}, expected "
                    f"{(n, *_shape(spec, d, t, f))}"
                )
        for k, (_, spec) in SNAPSHOT_KEYS.items():
            if np.asarray(snapshot[k]).shape != _shape(spec, d, t):
                raise ValueError(
                    f"snapshot[{k!r}] has shape {np.shape(snapshot[k])}, expected "
                    f"{_shape(spec, d, t)}"
                )
        self._buffer.append(snapshot)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write buffered snapshots as one shard, then list it in the manifest."""
        if not self._buffer:
            return
        snaps, self._buffer = self._buffer, []
        tensors: dict[str, np.ndarray] = {}
        lengths = [np.asarray(s["levels"]).shape[0] for s in snaps]
        tensors["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for k, (dtype, _) in entry_keys(self.meta).items():
            arr = np.concatenate([np.asarray(s[k]) for s in snaps]).astype(dtype)
            tensors[k] = arr.astype(np.uint8) if dtype is np.bool_ else arr
        for k, (dtype, _) in SNAPSHOT_KEYS.items():
            arr = np.stack([np.asarray(s[k]) for s in snaps]).astype(dtype)
            tensors[k] = arr.astype(np.uint8) if dtype is np.bool_ else arr
        name = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.path / (name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.path / name)
        self.shards.append(
            {"file": name, "n_snapshots": len(snaps), "sha256": _sha256(self.path / name)}
        )
        self._write_manifest(complete=False)

    def close(self) -> None:
        """Flush and mark the trace complete."""
        self.flush()
        self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> None:
        doc = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "meta": self.meta,
            "shards": self.shards,
            "n_snapshots": self.n_done,
            "complete": complete,
        }
        _atomic_write_text(self.path / MANIFEST, json.dumps(doc, indent=1))


class TraceReader:
    """Validated, in-memory view of a trace directory: ``len()``, ``reader[i]`` -> snapshot dict."""

    def __init__(
        self, path: str | Path | Sequence[str | Path], require_complete: bool = False
    ) -> None:
        # One trace directory, or a directory of parts written with --shard i/n (part-i-of-n/);
        # a list of such directories reads as one trace, in order (their d_model, n_tail_gists
        # and n_entry_features must agree; ``meta`` is the first's).
        paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
        if not paths:
            raise TraceFormatError("no trace directory given")
        self.path = paths[0]
        dirs = [d for p in paths for d in self._dirs(p)]
        manifests = [self.read_manifest(d) for d in dirs]
        for d, m in zip(dirs, manifests, strict=True):
            if require_complete and not m["complete"]:
                raise TraceFormatError(
                    f"{d / MANIFEST}: trace is incomplete (generation still running or crashed)"
                )
        self.meta = manifests[0]["meta"]
        self.d_model, self.n_tail_gists = int(self.meta["d_model"]), int(self.meta["n_tail"])
        self.n_entry_features = int(self.meta.get("n_entry_features", 0))
        for d, m in zip(dirs[1:], manifests[1:], strict=True):
            if (
                int(m["meta"]["d_model"]),
                int(m["meta"]["n_tail"]),
                int(m["meta"].get("n_entry_features", 0)),
            ) != (self.d_model, self.n_tail_gists, self.n_entry_features):
                raise TraceFormatError(
                    f"{d / MANIFEST}: d_model/n_tail_gists/n_entry_features differ from "
                    f"{dirs[0] / MANIFEST}"
                )
        self.entry_keys = entry_keys(self.meta)
        self._entries: dict[str, list[np.ndarray]] = {k: [] for k in self.entry_keys}
        self._snap: dict[str, list[np.ndarray]] = {k: [] for k in SNAPSHOT_KEYS}
        self._offsets: list[int] = [0]
        for d, m in zip(dirs, manifests, strict=True):
            for shard in m["shards"]:
                self._load_shard(d / shard["file"], shard)
        self.entries = {
            k: np.concatenate(v)
            if v
            else np.zeros(
                (0, *_shape(self.entry_keys[k][1], *self._dims)), self.entry_keys[k][0]
            )
            for k, v in self._entries.items()
        }
        self.snapshots = {
            k: np.concatenate(v)
            if v
            else np.zeros((0, *_shape(SNAPSHOT_KEYS[k][1], self.d_model, self.n_tail_gists)))
            for k, v in self._snap.items()
        }
        self.offsets = np.asarray(self._offsets, dtype=np.int64)
        del self._entries, self._snap

    @staticmethod
    def _dirs(path: Path) -> list[Path]:
        """The trace directories of ``path``: itself, or its ``part-i-of-n`` parts."""
        if (path / MANIFEST).exists():
            return [path]
        return [p.parent for p in sorted(path.glob("part-*-of-*/" + MANIFEST))] or [path]

    @staticmethod
    def read_manifest(path: Path) -> dict[str, Any]:
        file = Path(path) / MANIFEST
        if not file.exists():
            raise TraceFormatError(f"{file}: no manifest (not a trace directory)")
        try:
            doc = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise TraceFormatError(f"{file}: not valid JSON ({err})") from err
        if doc.get("format") != FORMAT:
            raise TraceFormatError(f"{file}: format {doc.get('format')!r}, expected {FORMAT!r}")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise TraceFormatError(
                f"{file}: schema_version {doc.get('schema_version')}, this reader reads "
                f"{SCHEMA_VERSION}"
            )
        for key in ("meta", "shards", "complete"):
            if key not in doc:
                raise TraceFormatError(f"{file}: missing {key!r}")
        return doc

    def _load_shard(self, file: Path, entry: dict[str, Any]) -> None:
        if not file.exists():
            raise TraceFormatError(f"{file}: listed in the manifest but missing")
        if _sha256(file) != entry["sha256"]:
            raise TraceFormatError(f"{file}: checksum mismatch (corrupt or truncated)")
        try:
            t = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise TraceFormatError(f"{file}: unreadable safetensors ({err})") from err
        missing = [k for k in ("offsets", *self.entry_keys, *SNAPSHOT_KEYS) if k not in t]
        if missing:
            raise TraceFormatError(f"{file}: missing arrays {missing}")
        off = t["offsets"]
        s = entry["n_snapshots"]
        if off.shape != (s + 1,) or off[0] != 0 or np.any(np.diff(off) < 0):
            raise TraceFormatError(
                f"{file}: bad offsets (shape {off.shape}, expected ({s + 1},), non-decreasing from "
                "0)"
            )
        n = int(off[-1])
        for k, (dtype, spec) in self.entry_keys.items():
            want = (n, *_shape(spec, *self._dims))
            if t[k].shape != want:
                raise TraceFormatError(
                    f"{file}: {k} has shape {t[k].shape}, expected {want} (d_model={self.d_model})"
                )
            self._entries[k].append(t[k].astype(dtype))
        for k, (dtype, spec) in SNAPSHOT_KEYS.items():
            want = (s, *_shape(spec, self.d_model, self.n_tail_gists))
            if t[k].shape != want:
                raise TraceFormatError(f"{file}: {k} has shape {t[k].shape}, expected {want}")
            self._snap[k].append(t[k].astype(dtype))
        base = self._offsets[-1]
        self._offsets.extend((base + off[1:]).tolist())

    @property
    def _dims(self) -> tuple[int, int, int]:
        return self.d_model, self.n_tail_gists, self.n_entry_features

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"snapshot {i} out of range ({len(self)})")
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        snap = {k: v[a:b] for k, v in self.entries.items()}
        snap.update({k: v[i] for k, v in self.snapshots.items()})
        return snap


def parse_shard(shard: str) -> tuple[int, int]:
    """(i, n) from a --shard 'i/n': this process writes part i of n (``OUT/part-i-of-n``)."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/n, got {shard!r}") from err
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {shard!r}")
    return i, n
