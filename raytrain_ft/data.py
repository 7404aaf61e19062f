"""Datasets, per-worker partitions, deterministic batch order and prefetch.

* Every dataset is loaded as ``(images float32 [N, C, H, W], labels int64 [N])``
  plus a held-out eval split.
* Worker ``rank`` of ``W`` owns the static partition ``perm[rank::W]`` of the
  training indices (``perm`` drawn from ``seed``), the way a parameter-server
  worker reads its own data shard.
* The batch for ``(seed, epoch, rank, step)`` is a pure function: the
  partition is shuffled by a generator seeded from ``(seed, epoch, rank)``, and
  step ``s`` of the epoch takes slice ``s*B:(s+1)*B``. A restarted worker
  therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset, default_collate

from raytrain_ft.config import DataConfig, flag_of, parse_image_shape
from raytrain_ft.errors import ConfigError, DataError
from raytrain_ft.rng import DATA, drawn_for

IMAGE_SHAPE_METADATA_KEY = b"raytrain_ft.image_shape"
MAX_CLASSES = 10_000
"""Largest number of classes a Parquet label column may imply (labels 0..MAX_CLASSES-1): a label of
100000 is a mistake (a wrong column, ids instead of classes), not a 100,000-way classifier."""


@dataclass(frozen=True)
class Dataset:
    train_x: torch.Tensor  # [N, C, H, W] float32
    train_y: torch.Tensor  # [N] int64
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


# --- sources -----------------------------------------------------------------


def _split(
    x: np.ndarray, y: np.ndarray, eval_fraction: float, seed: int, num_classes: int | None = None
) -> Dataset:
    rng = np.random.default_rng([seed, 0xE7A1])
    perm = rng.permutation(len(y))
    n_eval = max(1, int(round(len(y) * eval_fraction)))
    ev, tr = perm[:n_eval], perm[n_eval:]
    num_classes = int(num_classes if num_classes is not None else y.max() + 1)
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    return Dataset(
        t(x[tr], torch.float32),
        t(y[tr], torch.int64),
        t(x[ev], torch.float32),
        t(y[ev], torch.int64),
        num_classes,
    )


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / (x.std() + 1e-8)).astype(np.float32)


CACHE_DIR_ENV_VAR = "RAYTRAIN_FT_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "raytrain_ft")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images, target), kept in a cache file per scikit-learn version: every
    worker process loads the dataset, and importing scikit-learn costs about a second of CPU each
    time (a restarted worker waits on it too). A cache that cannot be read or written is skipped."""
    from importlib.metadata import version

    cache_dir = os.environ.get(CACHE_DIR_ENV_VAR) or os.path.expanduser(DEFAULT_CACHE_DIR)
    path = os.path.join(cache_dir, f"digits-sklearn-{version('scikit-learn')}.npz")
    try:
        with np.load(path) as f:
            return f["images"], f["target"]
    except (OSError, KeyError, ValueError):
        pass
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, images=raw.images, target=raw.target)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        pass
    return raw.images, raw.target


def load_digits(cfg: DataConfig, seed: int) -> Dataset:
    """sklearn's 1,797 real 8x8 handwritten digits, upsampled to ``image_size`` (bilinear)."""
    images, target = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    if cfg.image_size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False
        )
    return _split(_standardize(x.numpy()), target.astype(np.int64), cfg.eval_fraction, seed, 10)


def load_synthetic(cfg: DataConfig, seed: int, num_classes: int = 10) -> Dataset:
    """Learnable synthetic images: a fixed random prototype per class plus Gaussian noise."""
    rng = np.random.default_rng([seed, 0x5EED])
    s, c = cfg.image_size, cfg.synthetic_channels
    protos = rng.standard_normal((num_classes, c, s, s)).astype(np.float32)
    y = rng.integers(0, num_classes, cfg.synthetic_samples)
    x = protos[y] + 1.5 * rng.standard_normal((cfg.synthetic_samples, c, s, s)).astype(np.float32)
    return _split(x, y.astype(np.int64), cfg.eval_fraction, seed, num_classes)


MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""MNIST's files under ``ROOT/MNIST/raw`` (where ``torchvision.datasets.MNIST(ROOT, download=True)``
puts them), by split (train or not)."""
CIFAR10_FILES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
"""CIFAR-10's python batches under ``ROOT/cifar-10-batches-py`` (as ``torchvision.datasets.CIFAR10``
and the dataset's own archive lay them out), by split."""


def read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): 2 zero bytes, type 0x08, the number of
    dimensions, each dimension as a big-endian int32, then the values."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        raise DataError(path, "not an IDX file of unsigned bytes (an MNIST file)")
    nd = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", nd, 4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * nd)
    if values.size != int(np.prod(dims)):
        raise DataError(path, f"holds {values.size:,} values, its header says {dims}: truncated?")
    return values.reshape(dims)


def _image_split(name: str, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, C, H, W] and int64 labels of one split of MNIST or CIFAR-10 in ``root``."""
    if name == "mnist":
        folder, files = os.path.join(root, "MNIST", "raw"), MNIST_FILES[train]
    else:
        folder, files = os.path.join(root, "cifar-10-batches-py"), CIFAR10_FILES[train]
    paths = [os.path.join(folder, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            root,
            f"no {name} data found: {missing[0]} does not exist; put the dataset there first (e.g. "
            f"torchvision.datasets.{'MNIST' if name == 'mnist' else 'CIFAR10'}(root, "
            "download=True) on a machine with internet lays it out so)",
        )
    if name == "mnist":
        images, labels = (read_idx(p) for p in paths)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(folder, f"images {images.shape} and labels {labels.shape} do not match")
        return images[:, None, :, :], labels.astype(np.int64)
    import pickle

    xs, ys = [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as e:  # any unreadable batch: one line naming the file
            raise DataError(p, f"not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    return np.concatenate(xs), np.concatenate(ys)


def load_torchvision(cfg: DataConfig) -> Dataset:
    """CIFAR-10 / MNIST from a local root in torchvision's layout (never downloaded at run time)."""
    root = cfg.data_path or os.path.expanduser(os.path.join(DEFAULT_CACHE_DIR, "data"))
    arrays = []
    for train in (True, False):
        x, y = _image_split(cfg.dataset, root, train)
        arrays.append((x.astype(np.float32) / 255.0, y))
    (tx, ty), (ex, ey) = arrays
    mean = tx.mean(axis=(0, 2, 3), keepdims=True)
    std = tx.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return Dataset(f(tx), torch.from_numpy(ty), f(ex), torch.from_numpy(ey), 10)


def parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise DataError(path, "directory holds no *.parquet files")
        return files
    if not os.path.isfile(path):
        raise DataError(path, "Parquet file or directory does not exist; check --data-path")
    return [path]


def _shape_from_metadata(f: str, meta: dict) -> tuple[int, int, int]:
    key = IMAGE_SHAPE_METADATA_KEY.decode()
    try:
        text = meta[IMAGE_SHAPE_METADATA_KEY].decode()
        return parse_image_shape(text)
    except (
        UnicodeDecodeError,
        ValueError,
    ):  # (ConfigError is a ValueError) -- the file's fault, not a flag's
        raw = meta[IMAGE_SHAPE_METADATA_KEY]
        raise DataError(
            f,
            f"the file's metadata {key!r} is {raw.decode(errors='replace')!r}, not C,H,W with "
            "positive integers; "
            "rewrite the file with write_parquet, or pass --image-shape C,H,W",
        ) from None


def _check_columns(f: str, schema, cfg: DataConfig) -> None:
    import pyarrow as pa

    for col in (cfg.image_column, cfg.label_column):
        if col not in schema.names:
            raise DataError(
                f,
                f"has no column {col!r} (columns: {', '.join(schema.names)}); set "
                "--image-column/--label-column",
            )
    image_type = schema.field(cfg.image_column).type
    is_list = (
        pa.types.is_list(image_type)
        or pa.types.is_large_list(image_type)
        or pa.types.is_fixed_size_list(image_type)
    )
    if not is_list or not (
        pa.types.is_integer(image_type.value_type) or pa.types.is_floating(image_type.value_type)
    ):
        raise DataError(
            f,
            f"image column {cfg.image_column!r} has type {image_type}; it must hold each image as "
            "a flat list of numbers "
            "(see write_parquet), or set --image-column",
        )
    label_type = schema.field(cfg.label_column).type
    if not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type)):
        raise DataError(
            f,
            f"label column {cfg.label_column!r} has type {label_type}; it must hold integer class "
            "indices 0..K-1 "
            "(map class names to indices first), or set --label-column",
        )


def check_parquet(cfg: DataConfig) -> tuple[int, int, int]:
    """Validate the Parquet source without reading its rows (schema, shape metadata, row counts);
    returns the image shape."""
    import pyarrow.parquet as pq

    shape, shape_from, rows = None, None, 0
    files = parquet_files(cfg.data_path or "")
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f, f"not a readable Parquet file ({type(e).__name__}: {e})") from None
        _check_columns(f, schema, cfg)
        meta = schema.metadata or {}
        if cfg.image_shape:
            file_shape = parse_image_shape(cfg.image_shape)
        elif IMAGE_SHAPE_METADATA_KEY in meta:
            file_shape = _shape_from_metadata(f, meta)
        else:
            raise DataError(f, "records no image shape; pass --image-shape C,H,W")
        if shape is not None and file_shape != shape:
            raise DataError(
                f,
                f"records image shape {file_shape}, but {shape_from} records {shape}; give files "
                "of one shape",
            )
        shape, shape_from = file_shape, f
        image_type = schema.field(cfg.image_column).type
        size = int(np.prod(file_shape))
        if getattr(image_type, "list_size", size) != size:
            raise DataError(
                f,
                f"image column {cfg.image_column!r} holds {image_type.list_size} values per row; "
                f"shape {file_shape} needs {size}",
            )
        rows += num_rows
    if rows == 0:
        raise DataError(cfg.data_path or "", "holds no rows; give Parquet data with images in it")
    assert shape is not None
    return shape


def _checked_table(
    f: str, table, cfg: DataConfig, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One file's images [N, C, H, W] and labels [N], every row checked: one value per pixel, finite
    values, labels that are class indices."""
    import pyarrow.compute as pc

    size = int(np.prod(shape))
    n = len(table)
    images = table.column(cfg.image_column).combine_chunks()
    if images.null_count:
        row = int(np.flatnonzero(images.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f, f"image row {row} is null; every row needs an image")
    lengths = np.asarray(
        pc.list_value_length(images).to_numpy(zero_copy_only=False), dtype=np.int64
    )
    bad = np.flatnonzero(lengths != size)
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f,
            f"image row {row} holds {lengths[row]} values; shape {shape} needs {size} in every row "
            f"({bad.size} of {n} rows differ)",
        )
    flat = np.asarray(images.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    if flat.size != n * size:
        raise DataError(
            f, f"image column holds {flat.size} values for {n} rows; expected shape {shape} per row"
        )
    if not np.isfinite(flat).all():
        row = int(np.flatnonzero(~np.isfinite(flat))[0]) // size
        raise DataError(
            f, f"image row {row} holds a NaN, infinite or null value; images must be finite numbers"
        )
    labels = table.column(cfg.label_column).combine_chunks()
    col = cfg.label_column
    if labels.null_count:
        row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f, f"label column {col!r} is null in row {row}; every row needs a class index"
        )
    raw = np.asarray(labels.to_numpy(zero_copy_only=False))
    if raw.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if bad.size:
            row = int(bad[0])
            raise DataError(
                f,
                f"label column {col!r} holds {raw[row]:g} in row {row}; labels must be whole class "
                "indices 0..K-1",
            )
    if raw.size and (raw.min() < 0 or raw.max() >= MAX_CLASSES):
        row = int(np.argmin(raw)) if raw.min() < 0 else int(np.argmax(raw))
        raise DataError(
            f,
            f"label column {col!r} holds {raw[row]:g} in row {row}; labels must be class indices "
            "from 0 to "
            f"{MAX_CLASSES - 1} (at most {MAX_CLASSES:,} classes): is --label-column the class "
            "column?",
        )
    return flat.reshape(n, *shape), raw.astype(np.int64)


def load_parquet(cfg: DataConfig, seed: int) -> Dataset:
    import pyarrow.parquet as pq

    shape = check_parquet(cfg)
    xs, ys = [], []
    for f in parquet_files(cfg.data_path or ""):
        try:
            table = pq.read_table(f, columns=[cfg.image_column, cfg.label_column])
        except Exception as e:
            raise DataError(f, f"could not read rows ({type(e).__name__}: {e})") from None
        x, y = _checked_table(f, table, cfg, shape)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) == 0:
        raise DataError(cfg.data_path or "", "holds no rows; give Parquet data with images in it")
    return _split(x, y, cfg.eval_fraction, seed)


def write_parquet(path: str, x: np.ndarray, y: np.ndarray, row_group_size: int = 1024) -> None:
    """Write images [N, C, H, W] and labels [N] in the layout ``load_parquet`` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    images = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), c * h * w)
    table = pa.table({"image": images, "label": pa.array(np.asarray(y, dtype=np.int64))})
    table = table.replace_schema_metadata({IMAGE_SHAPE_METADATA_KEY: f"{c},{h},{w}".encode()})
    pq.write_table(table, path, row_group_size=row_group_size)


def check_source(cfg: DataConfig) -> None:
    """Cheap checks the driver runs before starting Ray, so bad paths fail fast."""
    if cfg.dataset == "parquet":
        check_parquet(cfg)
    elif cfg.dataset in ("cifar10", "mnist") and cfg.data_path and not os.path.isdir(cfg.data_path):
        raise DataError(
            cfg.data_path, f"{cfg.dataset} root directory does not exist; check --data-path"
        )


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.dataset == "digits":
        return load_digits(cfg, seed)
    if cfg.dataset == "synthetic":
        return load_synthetic(cfg, seed)
    if cfg.dataset in ("cifar10", "mnist"):
        return load_torchvision(cfg)
    if cfg.dataset == "parquet":
        return load_parquet(cfg, seed)
    raise DataError(cfg.dataset, "unknown dataset")


# --- partitions and batch order ------------------------------------------------


def partition(num_samples: int, rank: int, num_workers: int, seed: int) -> np.ndarray:
    """Training indices owned by ``rank``: a fixed shuffle of all indices, strided by rank."""
    perm = np.random.default_rng([seed, 0xDA7A]).permutation(num_samples)
    return perm[rank::num_workers]


def steps_per_epoch(num_samples: int, num_workers: int, batch_size: int) -> int:
    """Steps every worker can take per epoch (the smallest partition decides; last partial batch
    dropped)."""
    return (num_samples // num_workers) // batch_size


def checked_steps_per_epoch(
    num_samples: int, num_workers: int, batch_size: int, split: tuple[float, int] | None = None
) -> int:
    """``steps_per_epoch``, or a DataError naming what to change when it is 0. ``split``: (the
    eval fraction, the samples before it) when the training set is what that split left: the
    fraction is named when a smaller one leaves enough samples."""
    spe = steps_per_epoch(num_samples, num_workers, batch_size)
    if spe == 0:
        n, w, b = num_samples, num_workers, batch_size
        if split is not None and split[1] > w * b:
            fraction, total = split
            most = (total - w * b) / total  # n_eval = round(total * f) leaves w * b to train on
            raise DataError(
                "data.eval_fraction",
                f"--eval-fraction {fraction:g} holds out {total - n:,} of the {total:,} samples, "
                f"leaving {n:,}: too few for one batch of {b} on each of {w} workers; give an "
                f"--eval-fraction of at most {math.floor(most * 1000) / 1000:g}, or a smaller "
                "--batch-size",
            )
        if n == 0:
            raise DataError(
                "data.eval_fraction",
                "no training samples are left after the eval split; give more data or a smaller "
                "--eval-fraction",
            )
        if w > n:  # no batch size helps: the worker count is what to change
            hint = (
                f"use at most {n // b} --num-workers at --batch-size {b}"
                if n >= b
                else f"use fewer --num-workers and a --batch-size of at most {n}"
            )
            raise DataError(
                "cluster.num_workers",
                f"{n} training samples cannot fill one batch on each of {w:,} workers; {hint}",
            )
        more = f", or use at most {n // b} --num-workers" if n >= b else ""
        raise DataError(
            "data.batch_size",
            f"{n} training samples cannot fill one batch of {b} on each of {w} workers "
            f"({n // w} samples each); lower --batch-size to at most {n // w}{more}",
        )
    return spe


def batch_indices(
    part: np.ndarray, seed: int, epoch: int, rank: int, step_in_epoch: int, batch_size: int
) -> np.ndarray:
    """Indices of the batch for ``(seed, epoch, rank, step)``: a pure function."""
    order = np.random.default_rng([seed, epoch, rank, 0xBA7C]).permutation(len(part))
    return part[order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]]


def global_step_indices(
    num_samples: int, seed: int, rank: int, num_workers: int, batch_size: int, step: int
) -> np.ndarray:
    """Batch indices of worker ``rank`` at global ``step`` (epochs roll over)."""
    epoch, s = divmod(step, checked_steps_per_epoch(num_samples, num_workers, batch_size))
    return batch_indices(
        partition(num_samples, rank, num_workers, seed), seed, epoch, rank, s, batch_size
    )


@dataclass(frozen=True, slots=True)
class _Failed:
    """What the prefetch thread queues when a batch cannot be built (then it stops)."""

    error: DataError


class BatchStream:
    """Batches of one worker from ``start_step``: the batch of ``(seed, epoch, rank, step)`` over
    the rank's partition ``perm[rank::W]`` of ``dataset`` (a pure function of them), prepared ahead
    in a background thread."""

    def __init__(
        self,
        dataset,
        *,
        seed: int,
        rank: int,
        num_workers: int,
        batch_size: int,
        start_step: int,
        end_step: int,
        prefetch: int = 2,
        presplit: bool = False,
        pin_memory: bool = False,
    ):
        """``presplit``: ``dataset`` is already this rank's part (a Ray Dataset split on the
        driver): the rank shuffles all of it instead of taking ``perm[rank::W]``. ``pin_memory``:
        batches are built in page-locked memory (a GPU worker reading host data copies them to the
        device asynchronously)."""
        self.pin_memory = pin_memory
        self.dataset = dataset
        self.seed, self.rank, self.num_workers, self.batch_size = (
            seed,
            rank,
            num_workers,
            batch_size,
        )
        self.step, self.end_step = start_step, end_step
        owners = 1 if presplit else num_workers
        self._part = partition(len(dataset), 0 if presplit else rank, owners, seed)
        self._spe = checked_steps_per_epoch(len(dataset), owners, batch_size)
        self._queue: queue.Queue | None = None
        self._failed: DataError | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._fill, daemon=True, name=f"prefetch-{rank}")
            self._thread.start()

    def _make(self, step: int) -> tuple:
        epoch, s = divmod(step, self._spe)
        indices = batch_indices(self._part, self.seed, epoch, self.rank, s, self.batch_size)
        # the user's __getitem__ may draw (augmentation): from generators seeded for this batch
        draws = not isinstance(self.dataset, (TensorDataset, ColumnsDataset))
        try:
            with drawn_for(self.seed, self.rank, step, DATA) if draws else contextlib.nullcontext():
                batch = batch_of(self.dataset, indices)
        except Exception as e:  # the user's dataset: one line naming the step and its samples
            shown = ", ".join(str(int(i)) for i in indices[:8])
            more = ", ..." if len(indices) > 8 else ""
            raise DataError(
                "data.dataset",
                f"building the batch of step {step} (samples {shown}{more}) raised "
                f"{type(e).__name__}: {e}",
            ) from e
        return _pinned(batch) if self.pin_memory else batch

    def _fill(self) -> None:
        step = self.step
        while step < self.end_step and not self._stop.is_set():
            try:
                item = self._make(step)
            except DataError as e:  # handed to next(), which raises it in the training thread
                item = _Failed(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)  # type: ignore[union-attr]
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return
            step += 1

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.end_step:
            raise StopIteration
        if self._failed is not None:
            raise self._failed
        item = self._queue.get() if self._queue is not None else self._make(self.step)
        if isinstance(item, _Failed):
            self._failed = item.error  # the prefetch thread has stopped
            raise item.error
        self.step += 1
        return item

    def close(self) -> None:
        if self._queue is not None:
            self._stop.set()


def map_tensors(x, fn):
    """``x`` (a tensor, or dicts/lists/tuples of them) with ``fn`` applied to every tensor."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x


def _pinned(x):
    return map_tensors(x, torch.Tensor.pin_memory)


def dataset_on_device(ds, device, max_fraction: float = 0.25):
    """(dataset, moved): an in-memory dataset's tensors moved to ``device`` (a GPU) when they take
    at most ``max_fraction`` of its free memory -- batches are then gathered there, with no copy
    per step; else ``ds`` as it is."""
    device = torch.device(device)
    if device.type != "cuda":
        return ds, False
    if isinstance(ds, TensorDataset):
        tensors = list(ds.tensors)
    elif isinstance(ds, ColumnsDataset):
        tensors = [*ds.x.values(), ds.y]
    else:
        return ds, False
    free, _total = torch.cuda.mem_get_info(device)
    if sum(t.numel() * t.element_size() for t in tensors) > max_fraction * free:
        return ds, False
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t.to(device) for t in ds.tensors)), True
    return ColumnsDataset({c: t.to(device) for c, t in ds.x.items()}, ds.y.to(device)), True


def batch_of(ds, indices) -> tuple:
    """The (x, y) batch of ``indices``: tensors indexed at once for a ``TensorDataset`` or a
    ``ColumnsDataset``, else PyTorch's default collate of the samples (x may be a tensor or a dict
    of tensors)."""
    if isinstance(ds, TensorDataset):
        idx = torch.as_tensor(indices, device=ds.tensors[0].device)
        x, y = (t.index_select(0, idx) for t in ds.tensors[:2])
        return x, y
    if isinstance(ds, ColumnsDataset):
        idx = torch.as_tensor(indices, device=ds.y.device)
        return {c: t.index_select(0, idx) for c, t in ds.x.items()}, ds.y.index_select(0, idx)
    samples = [ds[int(i)] for i in indices]
    x, y = default_collate(samples)
    return x, y


# --- Ray Datasets ------------------------------------------------------------------


class ColumnsDataset(torch.utils.data.Dataset):
    """Samples ``({column: x}, y)`` from tensors held in memory (a Ray Dataset's rows with several
    input columns)."""

    def __init__(self, x: dict[str, torch.Tensor], y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {c: t[i] for c, t in self.x.items()}, self.y[i]


def is_ray_dataset(obj) -> bool:
    """Whether ``obj`` is a ``ray.data.Dataset`` (checked without importing Ray Data)."""
    return any(
        c.__module__.startswith("ray.data") and c.__name__.endswith("Dataset")
        for c in type(obj).__mro__
    )


def ray_columns(cfg: DataConfig) -> tuple[tuple[str, ...], str]:
    """The input column(s) and the target column (the config refuses names that are empty)."""
    return tuple(c.strip() for c in cfg.x_columns.split(",") if c.strip()), cfg.y_column.strip()


def check_ray_columns(ds, cfg: DataConfig, what: str) -> None:
    """The configured columns exist in the Ray Dataset ``ds`` (one line naming the flag if not)."""
    xs, y = ray_columns(cfg)
    with ray_data_run():
        schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    for column, flag in [(c, "data.x_columns") for c in xs] + [(y, "data.y_column")]:
        if column not in names:
            raise ConfigError(
                flag,
                f"the {what} Ray Dataset has no column {column!r} (its columns: "
                f"{', '.join(names) or 'none'}); name the column with {flag_of(flag)}",
            )


def _column_tensor(values: list, column: str, flag: str) -> torch.Tensor:
    ragged = ConfigError(
        flag,
        f"Ray Dataset column {column!r} holds values of different shapes or non-numbers; "
        "every row needs a number or an array of one shape",
    )
    try:
        a = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    except ValueError:  # blocks of rows of different shapes
        raise ragged from None
    if a.dtype == object:
        raise ragged
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)  # the models' dtype (float64 from pandas, say)
        if not np.isfinite(a).all():  # it would train to a nan loss, seen only as divergence
            row = int(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[0])
            raise ConfigError(
                flag,
                f"Ray Dataset column {column!r} holds a value that is not finite (nan or inf) in "
                f"row {row} of the part read here; drop or fill such rows before training",
            )
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        a = a.astype(np.int64, copy=False)
    else:
        raise ConfigError(
            flag, f"Ray Dataset column {column!r} has dtype {a.dtype}; it must hold numbers"
        )
    return torch.from_numpy(np.ascontiguousarray(a))


def _tensors_of(batches, cfg: DataConfig):
    """Numpy batches ({column: array}) as tensors in memory: a ``TensorDataset`` for one input
    column, a ``ColumnsDataset`` for several. Floating columns become float32, integer ones
    int64."""
    xs, y = ray_columns(cfg)
    cols: dict[str, list] = {c: [] for c in (*xs, y)}
    for batch in batches:
        for c in cols:
            cols[c].append(np.asarray(batch[c]))
    x = {c: _column_tensor(cols[c], c, "data.x_columns") for c in xs}
    target = _column_tensor(cols[y], y, "data.y_column")
    if len(xs) == 1:
        return TensorDataset(x[xs[0]], target)
    return ColumnsDataset(x, target)


@contextlib.contextmanager
def ray_data_run():
    """Ray Data's executions started here (materializing, counting, reading the eval set) keep the
    dataset's row order and print no progress lines (the run's own output stays the run's); the
    caller's settings are restored after."""
    import logging

    from ray.data import DataContext

    ctx, log = DataContext.get_current(), logging.getLogger("ray.data")
    order, bars, level = ctx.execution_options.preserve_order, ctx.enable_progress_bars, log.level
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = order, bars
        log.setLevel(level)


def materialized(ds):
    """The Ray Dataset ``ds`` executed once, in its row order, into the object store (owned by the
    caller): counting, checking and splitting it then read no source twice."""
    with ray_data_run():
        return ds.materialize()


def ray_dataset_tensors(ds, cfg: DataConfig):
    """All rows of the Ray Dataset ``ds`` (an eval set, or two rows to check) in memory."""
    with ray_data_run():
        return _tensors_of(ds.iter_batches(batch_size=None, batch_format="numpy"), cfg)


def part_tensors(block_refs, cfg: DataConfig):
    """One rank's part -- the object-store blocks ``split_ray_dataset`` gave it -- in memory, read
    straight from its blocks (no Ray Data execution in the worker: nothing to schedule, nothing
    printed)."""
    import ray
    from ray.data.block import BlockAccessor

    xs, y = ray_columns(cfg)
    blocks = ray.get(list(block_refs))
    return _tensors_of((BlockAccessor.for_block(b).to_numpy([*xs, y]) for b in blocks), cfg)


def split_ray_dataset(ds, num_workers: int) -> list[tuple]:
    """Per rank, the object-store blocks of its part: equal row counts (the last ``N mod W`` rows
    are dropped), in the dataset's row order, so the same dataset gives every rank the same rows in
    every run. The blocks are owned by the caller (the driver) and live as long as it holds
    them."""
    with ray_data_run():
        return [tuple(p.to_arrow_refs()) for p in ds.split(num_workers, equal=True)]
