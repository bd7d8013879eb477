"""A resumable evaluation store: masked-model losses on disk, keyed by model, data and utility.

Introduced in chapter 07 (the paper end to end on a real pretrained LLaMA), where stage 1 costs
hours of masked evaluations: a crash, a pre-empted Colab session or a killed job must cost at
most the chunk that was in flight, and several data-parallel processes must be able to share
one store. :class:`EvaluationStore` is one SQLite file mapping each keep-mask to the **mean
token NLL (loss)** of the model under that mask, the quantity :class:`~minilib.evaluation.LayerGame`
caches; utilities are computed from losses, so nothing else needs storing.

A store belongs to one evaluation: (model fingerprint, calibration hash, utility, n_layers), kept
in its ``meta`` table with the versions that produced it; opening it for anything else raises.

Durability and concurrency: WAL journal, ``busy_timeout``, ``synchronous=FULL``, and one
``BEGIN IMMEDIATE … COMMIT`` transaction per :meth:`EvaluationStore.record` call, so after a
SIGKILL every recorded chunk is there in full and no chunk is there in part; concurrent writers
wait for each other instead of failing. A mask recorded twice keeps its first value.

Mask keys: ``np.packbits(mask).tobytes()``, ``ceil(L/8)`` bytes, layer 0 the most significant bit
of byte 0 (NumPy's default ``bitorder="big"``), unused trailing bits 0; the same keys as
``LayerGame``'s in-memory cache. (:class:`~minilib.games.TabularGame` indexes an *integer* with bit
i = layer i instead; the two layouts are not interchangeable.)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .games import as_coalitions

FORMAT = "1"
IDENTITY = ("fingerprint", "calibration", "utility", "n_layers")
_LABELS = {"fingerprint": "model fingerprint", "calibration": "calibration hash", "utility": "utility",
           "n_layers": "n_layers"}
# config entries that change with how a model was saved, loaded or is being called, not with what
# it computes; the dtype is covered by each tensor's own dtype.
_VOLATILE_CONFIG = {"transformers_version", "dtype", "torch_dtype", "architectures", "use_cache", "return_dict",
                    "output_hidden_states", "output_attentions"}
_SQL_CHUNK = 500  # bound parameters per IN (...) query, below every SQLite build's limit


def model_fingerprint(model: Any, sample: int = 4096) -> str:
    """A cheap sha256 fingerprint of a model's architecture and weights (chapter 07).

    Hashes the class name, ``config.to_dict()`` without volatile keys (``_name_or_path``,
    ``transformers_version``, the config's ``dtype``, runtime flags…), then, for every
    parameter and buffer in ``state_dict`` order, its name, shape, dtype and ``sample`` values
    evenly spaced through it (all of them for small tensors), as raw bytes. It is a
    fingerprint, not a full hash: about 1.2 M values for a 7B model (milliseconds on a GPU), and
    a change confined to unsampled elements goes unnoticed. It is identical after
    ``save_pretrained``/``from_pretrained`` and changes with pruning (config and names), a
    different dtype, or new values in any layer.
    """
    import torch

    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    h = hashlib.sha256(f"{type(model).__name__}|".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    offloaded = _offloaded_tensors(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.device.type == "meta" and name in offloaded:
                tensor = offloaded[name]
            flat = tensor.detach().reshape(-1)
            k = min(flat.numel(), sample)
            idx = torch.arange(k, dtype=torch.int64) * flat.numel() // max(k, 1)
            values = flat[idx.to(flat.device)].cpu().contiguous()
            h.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            h.update(values.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _offloaded_tensors(model: Any) -> dict:
    """Weights that accelerate keeps off the model (``meta`` placeholders), by state_dict name.

    Offloaded modules carry an ``AlignDevicesHook`` whose ``weights_map`` holds the real values.
    """
    found = {}
    for prefix, module in model.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        for name in list(module._parameters) + list(module._buffers):
            try:
                found[f"{prefix}.{name}" if prefix else name] = weights[name]
            except KeyError:
                continue
    return found


def calibration_hash(input_ids: Any) -> str:
    """sha256 of a calibration batch: its shape and its token ids as little-endian int64 (chapter 07).

    Accepts a torch tensor or a NumPy array of integers; the result does not depend on the
    integer dtype or device, only on the shape and the ids.
    """
    if hasattr(input_ids, "detach"):
        input_ids = input_ids.detach().cpu().numpy()
    arr = np.asarray(input_ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"input_ids must hold integer token ids, got dtype {arr.dtype}")
    h = hashlib.sha256(f"shape={tuple(arr.shape)};".encode())
    h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return h.hexdigest()


def mask_keys(masks: np.ndarray) -> list[bytes]:
    """The store's key of each row of a bool ``(m, L)`` array: ``np.packbits(row).tobytes()`` (chapter 07)."""
    return [np.packbits(row).tobytes() for row in masks]


def _identity(fingerprint: str, calibration: str, utility: str, n_layers: int) -> dict[str, str]:
    for name, value in (("fingerprint", fingerprint), ("calibration", calibration), ("utility", utility)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    return {"fingerprint": fingerprint, "calibration": calibration, "utility": utility, "n_layers": str(int(n_layers))}


def _check_identity(where: str, stored: dict[str, str], wanted: dict[str, str]) -> None:
    """Raise a ValueError naming every identity field that differs, with both values."""
    missing = [k for k in IDENTITY if k not in stored]
    if missing:
        raise ValueError(f"{where} is not an evaluation store (its meta lacks {missing})")
    diffs = [f"{_LABELS[k]} differs: stored {stored[k]!r}, requested {wanted[k]!r}"
             for k in IDENTITY if stored[k] != wanted[k]]
    if diffs:
        path = Path(where)
        suggestion = path.with_name(f"{path.stem}-{wanted['fingerprint'][:8]}-{wanted['calibration'][:8]}"
                                    f"-{wanted['utility']}-L{wanted['n_layers']}{path.suffix or '.sqlite'}")
        raise ValueError(f"{where} holds evaluations of another (model, calibration, utility): "
                         + "; ".join(diffs) + f". Its losses would be wrong here: use a new path "
                         f"(e.g. {suggestion}) or delete the old file.")


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"minilib_version": __version__}
    for package in ("torch", "transformers", "numpy"):
        try:
            out[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[f"{package}_version"] = "absent"
    return out


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit) in WAL mode with a busy timeout."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        deadline = time.monotonic() + timeout
        while True:  # switching a brand-new file to WAL can meet a concurrent creator's lock
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != "wal":
            warnings.warn(f"{path}: SQLite refused WAL mode (got {mode!r}); concurrent writers will block readers")
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.OperationalError:  # e.g. still locked after the timeout: not the file's fault
        conn.close()
        raise
    except sqlite3.DatabaseError as err:
        conn.close()
        raise ValueError(f"{path} is not an evaluation store (SQLite said: {err})") from err
    return conn


def read_meta(path: str | Path) -> dict[str, str]:
    """The ``meta`` table of an existing store, without opening it for writing (chapter 07)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation store at {path}")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return dict(conn.execute("SELECT key, value FROM meta"))
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path} is not an evaluation store (SQLite said: {err})") from err
    finally:
        conn.close()


def load_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Read an exported table back: ``(masks bool (n, L), losses float64 (n,), meta)`` (chapter 07)."""
    with np.load(path, allow_pickle=False) as table:
        meta = json.loads(str(table["meta"]))
        masks = np.unpackbits(table["masks"], axis=1, count=int(meta["n_layers"])).astype(bool)
        return masks, table["values"].astype(np.float64), meta


class EvaluationStore:
    """Masked-evaluation losses of one (model, calibration, utility) in a SQLite file (chapter 07).

    Opening creates the file (and its folders) if needed; opening an existing store for
    another model fingerprint, calibration hash, utility or layer count raises a ValueError
    naming the field and both values. Values are float64 mean token NLLs; NaN cannot be stored
    (SQLite turns it into NULL) and is what :meth:`lookup` returns for a missing mask. Use it as
    a context manager, or call :meth:`close`. Counters: ``n_recorded`` (rows this handle added)
    and ``n_duplicates`` (masks it offered that were already there, kept with their first value).
    """

    def __init__(self, path: str | Path, *, fingerprint: str, calibration: str, utility: str, n_layers: int,
                 timeout: float = 60.0):
        wanted = _identity(fingerprint, calibration, utility, n_layers)
        self.path = Path(path)
        self.n_layers = int(n_layers)
        self.n_recorded = 0
        self.n_duplicates = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = _connect(self.path, timeout)
        try:
            with self._transaction() as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute("CREATE TABLE IF NOT EXISTS evals (mask BLOB PRIMARY KEY, value REAL NOT NULL)")
                stored = dict(conn.execute("SELECT key, value FROM meta"))
                if not stored:
                    stored = {**wanted, "format": FORMAT, "value": "mean token NLL per keep-mask",
                              "mask_key": "np.packbits(mask).tobytes(), layer 0 = most significant bit of byte 0",
                              "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              **_versions()}
                    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", stored.items())
            _check_identity(str(self.path), stored, wanted)
        except BaseException:
            self.close()
            raise
        self.meta = stored

    @classmethod
    def open(cls, path: str | Path, *, fingerprint: str, calibration: str, utility: str, n_layers: int,
             timeout: float = 60.0) -> "EvaluationStore":
        """Create or reopen the store at ``path`` for this identity (same as the constructor)."""
        return cls(path, fingerprint=fingerprint, calibration=calibration, utility=utility, n_layers=n_layers,
                   timeout=timeout)

    @classmethod
    def open_existing(cls, path: str | Path, timeout: float = 60.0) -> "EvaluationStore":
        """Reopen an existing store with whatever identity it has (to inspect, export or merge into)."""
        meta = read_meta(path)
        _check_identity(str(path), meta, meta)
        return cls(path, fingerprint=meta["fingerprint"], calibration=meta["calibration"],
                   utility=meta["utility"], n_layers=int(meta["n_layers"]), timeout=timeout)

    @property
    def identity(self) -> dict[str, str]:
        """The four fields that decide whether two stores hold comparable values."""
        return {k: self.meta[k] for k in IDENTITY}

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` (take the write lock now, waiting up to the busy timeout) … ``COMMIT``."""
        if self._conn is None:
            raise ValueError(f"the evaluation store {self.path} is closed")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _masks(self, masks: Any) -> np.ndarray:
        return as_coalitions(masks, self.n_layers, name="masks")

    def lookup(self, masks: Any) -> np.ndarray:
        """Stored losses of each row of ``masks`` (bool ``(m, L)``), NaN where a mask is missing."""
        masks = self._masks(masks)
        if self._conn is None:
            raise ValueError(f"the evaluation store {self.path} is closed")
        keys = mask_keys(masks)
        unique = list(dict.fromkeys(keys))
        found: dict[bytes, float] = {}
        for start in range(0, len(unique), _SQL_CHUNK):
            part = unique[start: start + _SQL_CHUNK]
            found.update(self._conn.execute(
                f"SELECT mask, value FROM evals WHERE mask IN ({','.join('?' * len(part))})", part))
        return np.array([found.get(k, np.nan) for k in keys], dtype=np.float64)

    def record(self, masks: Any, values: Any) -> int:
        """Store ``values[i]`` for ``masks[i]`` in one transaction; returns how many masks were new.

        ``INSERT OR IGNORE``: a mask already stored (by any process, or earlier in this batch)
        keeps its first value and counts in ``n_duplicates``.
        """
        masks = self._masks(masks)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) != len(masks):
            raise ValueError(f"got {len(masks)} masks but {len(values)} values")
        if np.isnan(values).any():
            raise ValueError("values must not be NaN (SQLite would store NULL; a NaN loss means a broken evaluation)")
        if not len(masks):
            return 0
        rows = list(zip(mask_keys(masks), values.tolist()))
        with self._transaction() as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO evals (mask, value) VALUES (?, ?)", rows)
            new = conn.total_changes - before
        self.n_recorded += new
        self.n_duplicates += len(rows) - new
        return new

    def __len__(self) -> int:
        if self._conn is None:
            raise ValueError(f"the evaluation store {self.path} is closed")
        return int(self._conn.execute("SELECT COUNT(*) FROM evals").fetchone()[0])

    def masks_and_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored mask, bool ``(n, L)``, and its loss, float64 ``(n,)``, in recording order."""
        if self._conn is None:
            raise ValueError(f"the evaluation store {self.path} is closed")
        rows = self._conn.execute("SELECT mask, value FROM evals ORDER BY rowid").fetchall()
        packed = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.uint8).reshape(len(rows), -(-self.n_layers // 8))
        masks = np.unpackbits(packed, axis=1, count=self.n_layers).astype(bool)
        return masks, np.array([r[1] for r in rows], dtype=np.float64)

    def export(self, path: str | Path) -> Path:
        """Write every row to a compressed ``.npz`` (packed masks, losses, meta as JSON) for shipping.

        Read it back with :func:`load_table`, or into a store with :meth:`import_`. Returns the
        path written (NumPy appends ``.npz`` when missing).
        """
        masks, values = self.masks_and_values()
        path = Path(path)
        path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        meta = {**self.meta, "n_rows": str(len(values)),
                "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        np.savez_compressed(path, masks=np.packbits(masks, axis=1), values=values, meta=np.array(json.dumps(meta)))
        return path

    def import_(self, path: str | Path) -> int:
        """Record the rows of an exported table after checking it has this store's identity; returns rows added."""
        masks, values, meta = load_table(path)
        _check_identity(str(path), meta, self.identity)
        return self.record(masks, values)

    def merge_from(self, other: str | Path) -> int:
        """Copy every row of another store of the same identity (e.g. a per-rank file) in one transaction.

        Rows already here keep their values; returns how many rows were added.
        """
        _check_identity(str(other), read_meta(other), self.identity)
        with EvaluationStore.open_existing(other) as source:
            masks, values = source.masks_and_values()
        return self.record(masks, values)

    def close(self) -> None:
        """Close the connection (idempotent); recorded rows are already committed."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "EvaluationStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        rows = len(self) if self._conn is not None else "closed"
        return (f"EvaluationStore({str(self.path)!r}, rows={rows}, utility={self.meta.get('utility')!r}, "
                f"n_layers={self.n_layers}, fingerprint={self.meta.get('fingerprint', '')[:12]}…)")


def open_for_game(path: str | Path, model: Any, input_ids: Any, utility: str, **kwargs: Any) -> EvaluationStore:
    """The store of a ``LayerGame(model, input_ids, utility)``: identity from the model and data (chapter 07)."""
    from .layers import decoder_layers

    return EvaluationStore.open(path, fingerprint=model_fingerprint(model), calibration=calibration_hash(input_ids),
                                utility=utility, n_layers=len(decoder_layers(model)), **kwargs)


def evaluate_missing(store: EvaluationStore, masks: Any, evaluate: Callable[[np.ndarray], Any],
                     chunk_size: int = 8) -> tuple[np.ndarray, int]:
    """Losses of ``masks`` from ``store``, evaluating and recording only the missing ones (chapter 07).

    The resumable loop in one place: look every mask up, send each distinct missing mask
    through ``evaluate`` (bool ``(k, L)`` → ``k`` losses) ``chunk_size`` at a time, and record
    each chunk in its own transaction as soon as it is done, so a killed run loses at most the
    chunk in flight. Returns ``(losses (m,), number of masks evaluated)``; losses are read back
    from the store, so a mask another process recorded first gets that process's value.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    masks = store._masks(masks)
    missing = np.isnan(store.lookup(masks))
    todo = list({k: m for k, m in zip(mask_keys(masks[missing]), masks[missing])}.values())
    for start in range(0, len(todo), chunk_size):
        chunk = np.stack(todo[start: start + chunk_size])
        store.record(chunk, evaluate(chunk))
    return store.lookup(masks), len(todo)


SHIPPED = Path(__file__).resolve().parent / "assets"


@dataclass
class ShippedTable:
    """A precomputed stage-1 table shipped with minilib: masks, losses, calibration ids, manifest (chapter 07).

    ``losses[i]`` is the mean token NLL of the model keeping ``masks[i]`` on ``calibration_ids``;
    :meth:`values` turns them into the paper's utility. ``manifest`` says how it was made (model
    file hash, calibration source and hash, design, versions, seed, wall time, machine).
    """

    masks: np.ndarray
    losses: np.ndarray
    calibration_ids: Any
    manifest: dict
    meta: dict

    @property
    def base_loss(self) -> float:
        """Loss of the full model (the all-True mask, always in the table)."""
        full = np.flatnonzero(self.masks.all(axis=1))
        if len(full) != 1:
            raise ValueError("the table has no full-model row")
        return float(self.losses[full[0]])

    def values(self, utility: str = "ppl_ratio") -> np.ndarray:
        """``ppl_ratio`` = base PPL / PPL(mask) (the paper's), or ``neg_loss`` = −loss."""
        if utility == "ppl_ratio":
            return np.exp(self.base_loss - self.losses)
        if utility == "neg_loss":
            return -self.losses
        raise ValueError(f"utility must be 'ppl_ratio' or 'neg_loss', got {utility!r}")

    def lookup(self, masks, utility: str = "ppl_ratio") -> np.ndarray:
        """Values of ``masks`` (bool, ``(m, L)``) read from the table; NaN where a mask was not evaluated."""
        masks = np.atleast_2d(np.asarray(masks, dtype=bool))
        n = self.masks.shape[1]
        if masks.shape[1] != n:
            raise ValueError(f"masks must have {n} columns (one per layer), got shape {masks.shape}")
        index = dict(zip(mask_keys(self.masks), self.values(utility)))
        return np.array([index.get(k, np.nan) for k in mask_keys(masks)])

    def pair_interactions(self, utility: str = "ppl_ratio") -> np.ndarray:
        """Pairwise removal interactions I_ij = v(N∖ij) − v(N∖i) − v(N∖j) + v(N), an ``(L, L)`` matrix (chapter 07).

        Positive: removing both costs *less* than the two single removals add up to (the layers
        are partly redundant); negative: removing both costs more (they complement each other).
        Needs the full model, every leave-one-out and every pair in the table; the diagonal is 0.
        """
        n = self.masks.shape[1]
        full = self.lookup(np.ones((1, n), dtype=bool), utility)[0]
        single = self.lookup(~np.eye(n, dtype=bool), utility)
        rows, cols = np.triu_indices(n, 1)
        pairs = np.ones((len(rows), n), dtype=bool)
        pairs[np.arange(len(rows)), rows] = False
        pairs[np.arange(len(rows)), cols] = False
        both = self.lookup(pairs, utility)
        if np.isnan(both).any() or np.isnan(single).any() or np.isnan(full):
            raise ValueError("pair_interactions needs the full model, all leave-one-out masks and all pairs "
                             "in the table")
        out = np.zeros((n, n))
        out[rows, cols] = both - single[rows] - single[cols] + full
        return out + out.T


def load_shipped_table(name: str = "smollm2") -> ShippedTable:
    """Load a shipped stage-1 table, e.g. SmolLM2-135M's (``scripts/precompute_stage1.py``) (chapter 07)."""
    import torch

    folder = SHIPPED / name
    if not (folder / "stage1.npz").is_file():
        available = sorted(p.parent.name for p in SHIPPED.glob("*/stage1.npz"))
        raise ValueError(f"name: no shipped stage-1 table {name!r}; available: {available}")
    masks, losses, meta = load_table(folder / "stage1.npz")
    ids = torch.from_numpy(np.load(folder / "calibration_ids.npy").astype(np.int64))
    manifest = json.loads((folder / "stage1_manifest.json").read_text())
    if calibration_hash(ids) != meta["calibration"]:
        raise ValueError(f"{folder}: calibration_ids.npy does not match the table's calibration hash")
    return ShippedTable(masks, losses, ids, manifest, meta)
