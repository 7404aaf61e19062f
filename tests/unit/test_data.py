import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from raytrain_ft.config import DataConfig
from raytrain_ft.data import (
    BatchStream,
    batch_indices,
    check_source,
    global_step_indices,
    load_dataset,
    partition,
    steps_per_epoch,
    write_parquet,
)
from raytrain_ft.errors import ConfigError, DataError


def test_partitions_are_disjoint_and_cover():
    parts = [partition(103, r, 4, seed=5) for r in range(4)]
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(103))


def test_batch_order_is_pure_and_varies_by_epoch_and_rank():
    part = partition(200, 1, 2, seed=0)
    a = batch_indices(part, 0, epoch=0, rank=1, step_in_epoch=3, batch_size=8)
    assert np.array_equal(a, batch_indices(part, 0, 0, 1, 3, 8))
    assert not np.array_equal(a, batch_indices(part, 0, 1, 1, 3, 8))
    assert set(a) <= set(part)
    # one epoch of steps visits distinct samples
    spe = steps_per_epoch(200, 2, 8)
    seen = np.concatenate([batch_indices(part, 0, 0, 1, s, 8) for s in range(spe)])
    assert len(set(seen)) == len(seen) == spe * 8


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batch_stream_matches_pure_function_from_any_start(prefetch):
    x = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)
    y = torch.arange(100)
    s = BatchStream(
        TensorDataset(x, y),
        seed=3,
        rank=0,
        num_workers=2,
        batch_size=5,
        start_step=7,
        end_step=25,
        prefetch=prefetch,
    )
    for step in range(7, 25):  # crosses epoch boundaries (10 steps per epoch)
        xb, yb = s.next()
        assert np.array_equal(yb.numpy(), global_step_indices(100, 3, 0, 2, 5, step))
        assert torch.equal(xb.view(-1).long(), yb)
    with pytest.raises(StopIteration):
        s.next()
    s.close()


class _MissingFile(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        if i == 57:
            raise FileNotFoundError(f"img_{i}.png")
        return torch.zeros(2), 0


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_sample_the_dataset_cannot_give_fails_the_step_in_one_line(prefetch):
    """Raised in the prefetch thread it reaches the training thread (it used to wait forever)."""
    s = BatchStream(
        _MissingFile(),
        seed=0,
        rank=0,
        num_workers=1,
        batch_size=10,
        start_step=0,
        end_step=30,
        prefetch=prefetch,
    )
    with pytest.raises(DataError) as e:
        for _ in range(30):
            s.next()
    assert str(e.value).startswith("data.dataset: building the batch of step ")
    assert "57" in str(e.value) and "FileNotFoundError: img_57.png" in str(e.value)
    with pytest.raises(DataError):  # and again: the step is not skipped
        s.next()
    s.close()


def test_batch_too_large_names_the_field():
    with pytest.raises(DataError, match="batch"):
        global_step_indices(10, 0, 0, 2, 8, 0)


def test_digits_and_synthetic_shapes():
    d = load_dataset(DataConfig(dataset="digits", image_size=16), seed=0)
    assert d.in_shape == (1, 16, 16) and d.num_classes == 10
    assert len(d.train_y) + len(d.eval_y) == 1797
    assert abs(len(d.eval_y) - 0.2 * 1797) <= 1
    s = load_dataset(DataConfig(dataset="synthetic", image_size=8, synthetic_samples=500), seed=0)
    assert s.train_x.shape[1:] == (1, 8, 8) and s.train_x.dtype == torch.float32


def test_digits_come_from_a_cache_file_after_the_first_load(tmp_path, monkeypatch):
    """Workers skip importing scikit-learn once a cache file exists; the values are the same, and a
    damaged cache file is replaced rather than trusted."""
    import sklearn.datasets

    from raytrain_ft import data

    monkeypatch.setenv(data.CACHE_DIR_ENV_VAR, str(tmp_path))
    cfg = DataConfig(dataset="digits")
    first = data.load_digits(cfg, 0)
    (cache,) = tmp_path.glob("digits-sklearn-*.npz")
    raw = sklearn.datasets.load_digits()
    images, target = data._digits_arrays()
    assert np.array_equal(images, raw.images) and np.array_equal(target, raw.target)
    monkeypatch.setattr(sklearn.datasets, "load_digits", None)  # a second load must not call it
    again = data.load_digits(cfg, 0)
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.eval_y, first.eval_y)
    monkeypatch.undo()
    monkeypatch.setenv(data.CACHE_DIR_ENV_VAR, str(tmp_path))
    cache.write_bytes(b"not an npz")
    assert torch.equal(data.load_digits(cfg, 0).train_x, first.train_x)
    assert np.array_equal(np.load(cache)["images"], raw.images)  # rewritten whole
    monkeypatch.setenv(data.CACHE_DIR_ENV_VAR, str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the cache directory should be")
    assert torch.equal(data.load_digits(cfg, 0).train_x, first.train_x)  # no cache: still loads


def test_parquet_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 2, 3, 3)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    path = tmp_path / "train.parquet"
    write_parquet(str(path), x, y, row_group_size=16)
    for source in (str(path), str(tmp_path)):
        cfg = DataConfig(dataset="parquet", data_path=source, eval_fraction=0.2)
        check_source(cfg)
        d = load_dataset(cfg, seed=0)
        assert d.in_shape == (2, 3, 3) and d.num_classes == int(y.max()) + 1
        got = torch.cat([d.train_x, d.eval_x]).numpy()
        assert np.allclose(np.sort(got.reshape(50, -1), axis=0), np.sort(x.reshape(50, -1), axis=0))


def test_parquet_errors_name_the_file(tmp_path):
    missing = DataConfig(dataset="parquet", data_path=str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="nope.parquet.*does not exist"):
        check_source(missing)
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="bad.parquet.*not a readable Parquet"):
        check_source(DataConfig(dataset="parquet", data_path=str(corrupt)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no \\*.parquet"):
        check_source(DataConfig(dataset="parquet", data_path=str(empty_dir)))
    good = tmp_path / "g" / "x.parquet"
    good.parent.mkdir()
    write_parquet(str(good), np.zeros((4, 1, 2, 2)), np.zeros(4))
    with pytest.raises(DataError, match="no column 'pixels'"):
        check_source(DataConfig(dataset="parquet", data_path=str(good), image_column="pixels"))


def test_torchvision_missing_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_source(DataConfig(dataset="cifar10", data_path=str(tmp_path / "none")))
    with pytest.raises(DataError, match="no cifar10 data found"):
        load_dataset(DataConfig(dataset="cifar10", data_path=str(tmp_path)), seed=0)


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_loader_reads_a_local_torchvision_root(tmp_path):
    """The real torchvision MNIST path, on small idx files laid out as torchvision expects."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), 2049)
    cfg = DataConfig(dataset="mnist", data_path=str(tmp_path))
    check_source(cfg)
    d = load_dataset(cfg, seed=0)
    assert d.in_shape == (1, 28, 28) and d.num_classes == 10
    assert len(d.train_y) == 40 and len(d.eval_y) == 12  # the test split is the eval split
    assert (
        abs(float(d.train_x.mean())) < 1e-4 and abs(float(d.train_x.std()) - 1) < 1e-2
    )  # standardized


def test_cifar10_loader_reads_python_batches_and_names_a_broken_one(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps(batch))
    d = load_dataset(DataConfig(dataset="cifar10", data_path=str(tmp_path)), seed=0)
    assert d.in_shape == (3, 32, 32) and len(d.train_y) == 20 and len(d.eval_y) == 4
    assert d.train_y.tolist() == [1, 2, 3, 4] * 5
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a CIFAR-10 python batch"):
        load_dataset(DataConfig(dataset="cifar10", data_path=str(tmp_path)), seed=0)


def test_a_truncated_mnist_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 4), ("t10k", 2)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.zeros(n), 2049)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset(DataConfig(dataset="mnist", data_path=str(tmp_path)), seed=0)


def _table_file(path, images, labels, shape: bytes | None = b"1,2,2"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrain_ft.data import IMAGE_SHAPE_METADATA_KEY

    table = pa.table({"image": images, "label": labels})
    if shape is not None:
        table = table.replace_schema_metadata({IMAGE_SHAPE_METADATA_KEY: shape})
    pq.write_table(table, str(path))
    return str(path)


def _bad_parquet(kind: str, d) -> str:
    import pyarrow as pa

    ok_images = pa.array([[0.0] * 4] * 4)
    if kind == "zero rows":
        path = str(d / "empty.parquet")
        write_parquet(path, np.zeros((0, 1, 2, 2)), np.zeros(0))
        return path
    if kind == "string labels":
        return _table_file(d / "names.parquet", ok_images, pa.array(["cat", "dog", "cat", "dog"]))
    if kind == "fractional labels":
        return _table_file(d / "frac.parquet", ok_images, pa.array([0.0, 1.5, 0.0, 1.0]))
    if kind == "huge label":
        path = str(d / "ids.parquet")
        write_parquet(path, np.zeros((4, 1, 2, 2)), np.array([0, 1, 2, 100000]))
        return path
    if kind == "negative label":
        path = str(d / "neg.parquet")
        write_parquet(path, np.zeros((4, 1, 2, 2)), np.array([0, -1, 2, 1]))
        return path
    if kind == "ragged rows":  # 3 + 5 + 4 + 4 values: the total is 4 rows x 4, the rows are not
        return _table_file(
            d / "ragged.parquet",
            pa.array([[0.0] * 3, [0.0] * 5, [0.0] * 4, [0.0] * 4]),
            pa.array([0, 1, 0, 1]),
        )
    if kind == "null image":
        return _table_file(
            d / "null.parquet",
            pa.array([[0.0] * 4, None, [0.0] * 4, [0.0] * 4]),
            pa.array([0, 1, 0, 1]),
        )
    if kind == "nan pixel":
        return _table_file(
            d / "nan.parquet",
            pa.array([[0.0] * 4, [float("nan")] * 4, [0.0] * 4, [0.0] * 4]),
            pa.array([0, 1, 0, 1]),
        )
    if kind == "scalar image column":
        return _table_file(
            d / "scalar.parquet", pa.array([1.0, 2.0, 3.0, 4.0]), pa.array([0, 1, 0, 1])
        )
    if kind == "bad shape metadata":
        return _table_file(d / "meta.parquet", ok_images, pa.array([0, 1, 0, 1]), shape=b"1,x,2")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("zero rows", "holds no rows"),
        (
            "string labels",
            "label column 'label' has type string; it must hold integer class indices",
        ),
        (
            "fractional labels",
            "label column 'label' holds 1.5 in row 1; labels must be whole class indices",
        ),
        (
            "huge label",
            "label column 'label' holds 100000 in row 3; labels must be class indices from 0 to "
            "9999",
        ),
        ("negative label", "label column 'label' holds -1 in row 1"),
        (
            "ragged rows",
            r"image row 0 holds 3 values; shape \(1, 2, 2\) needs 4 in every row \(2 of 4 rows "
            r"differ\)",
        ),
        ("null image", "image row 1 is null"),
        ("nan pixel", "image row 1 holds a NaN"),
        ("scalar image column", "image column 'image' has type double"),
        (
            "bad shape metadata",
            "the file's metadata 'raytrain_ft.image_shape' is '1,x,2', not C,H,W",
        ),
    ],
)
def test_bad_parquet_contents_name_the_file(tmp_path, kind, message):
    path = _bad_parquet(kind, tmp_path)
    cfg = DataConfig(dataset="parquet", data_path=path)
    with pytest.raises(DataError, match=message) as e:
        check_source(cfg)
        load_dataset(cfg, seed=0)
    assert e.value.path == path and "data.image_shape:" not in str(e.value)


def test_files_of_different_shapes_are_refused(tmp_path):
    write_parquet(str(tmp_path / "a.parquet"), np.zeros((4, 1, 2, 2)), np.zeros(4))
    write_parquet(str(tmp_path / "b.parquet"), np.zeros((4, 1, 3, 3)), np.zeros(4))
    with pytest.raises(
        DataError,
        match=r"b.parquet: records image shape \(1, 3, 3\), but .*a.parquet records \(1, 2, 2\)",
    ):
        check_source(DataConfig(dataset="parquet", data_path=str(tmp_path)))


def test_too_many_workers_is_blamed_on_the_worker_count():
    from raytrain_ft.data import checked_steps_per_epoch

    with pytest.raises(
        DataError,
        match=r"cluster.num_workers: 1438 training samples cannot fill one batch on each of "
        r"99,999,999 workers; "
        r"use at most 44 cluster.num_workers at data.batch_size=32",
    ):
        checked_steps_per_epoch(1438, 99_999_999, 32)
    with pytest.raises(
        DataError,
        match=r"data.batch_size: 1438 training samples cannot fill one batch of 512 on each of 4 "
        r"workers "
        r"\(359 samples each\); lower data.batch_size to at most 359, or use at most 2 "
        r"cluster.num_workers",
    ):
        checked_steps_per_epoch(1438, 4, 512)


def test_too_few_training_samples_after_the_eval_split_is_blamed_on_the_eval_fraction():
    from raytrain_ft.data import checked_steps_per_epoch

    with pytest.raises(
        DataError,
        match=r"data.eval_fraction: data.eval_fraction=0.999 holds out 1,795 of the 1,797 samples, "
        r"leaving 2: too few for one batch of 32 on each of 2 workers; give a "
        r"data.eval_fraction of at most 0.964",
    ):
        checked_steps_per_epoch(2, 2, 32, (0.999, 1797))
    # at the largest fraction it names, the batches fit
    assert checked_steps_per_epoch(1797 - round(1797 * 0.964), 2, 32, (0.964, 1797)) == 1
    # no fraction leaves enough: the batch is what to change
    with pytest.raises(DataError, match="data.batch_size: 40 training samples"):
        checked_steps_per_epoch(40, 2, 32, (0.2, 50))


def test_a_presplit_part_is_shuffled_whole_by_its_rank_each_epoch():
    """A rank's own part (a Ray Dataset split on the driver): every epoch visits each of its rows
    once (the last partial batch dropped), in an order fixed by (seed, epoch, rank)."""
    import torch
    from torch.utils.data import TensorDataset

    from raytrain_ft.data import BatchStream

    part = TensorDataset(torch.arange(20), torch.arange(20))

    def epochs(rank):
        s = BatchStream(
            part,
            seed=1,
            rank=rank,
            num_workers=4,
            batch_size=5,
            start_step=0,
            end_step=8,
            prefetch=0,
            presplit=True,
        )
        return [torch.cat([s.next()[0] for _ in range(4)]).tolist() for _ in range(2)]

    a = epochs(1)
    assert all(sorted(e) == list(range(20)) for e in a) and a[0] != a[1]
    assert epochs(1) == a and epochs(2) != a


class _Augmented(torch.utils.data.Dataset):
    """Samples with noise drawn in ``__getitem__`` from torch's, NumPy's and Python's generators."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        import random

        noise = torch.randn(3) + float(np.random.standard_normal()) + random.random()
        return torch.full((3,), float(i)) + noise, i % 2


def test_a_batch_drawn_by_the_users_dataset_is_a_pure_function_of_seed_rank_and_step():
    """A rank's batch draws the same augmentation whether it was prefetched or not, whether the
    stream started at step 0 or resumed at the step (a restarted rank), and whatever another
    thread draws meanwhile (a training thread's dropout, another rank's stream)."""
    import threading

    from raytrain_ft.rng import COMPUTE, drawn_for

    def stream(start: int, prefetch: int, rank: int = 1) -> BatchStream:
        return BatchStream(
            _Augmented(),
            seed=3,
            rank=rank,
            num_workers=2,
            batch_size=4,
            start_step=start,
            end_step=12,
            prefetch=prefetch,
        )

    stop = threading.Event()

    def other_thread():  # draws as a training thread does: dropout in forward and backward
        while not stop.is_set():
            with drawn_for(3, 0, 0, COMPUTE):
                torch.rand(100), np.random.random(), __import__("random").random()

    noise = threading.Thread(target=other_thread, daemon=True)
    noise.start()
    try:
        whole = stream(0, prefetch=2)
        batches = [whole.next()[0] for _ in range(12)]
        inline = stream(0, prefetch=0)
        assert all(torch.equal(inline.next()[0], b) for b in batches)
        resumed = stream(7, prefetch=2)
        assert all(torch.equal(resumed.next()[0], b) for b in batches[7:])
        other_rank = stream(0, prefetch=2, rank=0)
        assert not torch.equal(other_rank.next()[0], batches[0])  # another rank draws other noise
        assert not torch.equal(batches[0], batches[1])
    finally:
        stop.set()
        noise.join()


def test_ray_dataset_rows_of_other_shapes_or_not_finite_name_the_column_flag():
    """Blocks of rows of different shapes raised numpy's concatenate error on the worker (30 lines
    of traceback naming no flag); a nan trained on and was reported as divergence."""
    from raytrain_ft.data import _tensors_of

    cfg = DataConfig(x_columns="a", y_column="y")
    y = np.zeros(2, dtype=np.float32)
    ragged = [
        {"a": np.zeros((2, 3), np.float32), "y": y},
        {"a": np.zeros((2, 5), np.float32), "y": y},
    ]
    with pytest.raises(ConfigError, match="column 'a' holds values of different shapes") as e:
        _tensors_of(ragged, cfg)
    assert e.value.field == "data.x_columns"
    nan = np.zeros((2, 3), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(
        ConfigError, match=r"column 'a' holds a value that is not finite .* row 3"
    ) as e:
        _tensors_of([{"a": np.zeros((2, 3), np.float32), "y": y}, {"a": nan, "y": y}], cfg)
    assert e.value.field == "data.x_columns"
    ds = _tensors_of([{"a": np.ones((2, 3), np.float64), "y": y}], cfg)
    assert ds.tensors[0].dtype == torch.float32 and len(ds) == 2
