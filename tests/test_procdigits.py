"""The procedural MNIST-size digits: generator, disk cache, IDX reader, and the task."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.tasks import procdigits_data as pd
from edge_sdk.tasks.base import TrainConfig

SMALL = (200, 50)


@pytest.fixture(scope="module")
def small() -> pd.DigitSet:
    return pd.generate(*SMALL, seed=0)


# ----------------------------------------------------------------------------- generator


def test_same_seed_same_arrays_and_seeds_differ(small: pd.DigitSet) -> None:
    again = pd.generate(*SMALL, seed=0)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(again, name), getattr(small, name))
    other = pd.generate(*SMALL, seed=1)
    assert not np.array_equal(other.train_x, small.train_x)
    assert not np.array_equal(other.train_y, small.train_y)
    # Train and test are drawn from different streams, not the same images twice.
    assert not np.array_equal(small.train_x[:50], small.test_x)


def test_worker_count_does_not_change_the_arrays() -> None:
    n_train = pd.CHUNK + 20  # two train chunks and one test chunk across two processes
    one = pd.generate(n_train, 20, seed=3, workers=1)
    two = pd.generate(n_train, 20, seed=3, workers=2)
    np.testing.assert_array_equal(one.train_x, two.train_x)
    np.testing.assert_array_equal(one.test_y, two.test_y)


def test_shapes_dtypes_ranges_and_exact_class_balance(small: pd.DigitSet) -> None:
    assert small.train_x.shape == (200, 28, 28) and small.train_x.dtype == np.uint8
    assert small.test_x.shape == (50, 28, 28) and small.test_y.dtype == np.int64
    assert np.bincount(small.train_y, minlength=10).tolist() == [20] * 10
    assert np.bincount(small.test_y, minlength=10).tolist() == [5] * 10
    x = pd.DigitSet.as_float(small.train_x)
    assert x.shape == (200, 1, 28, 28) and x.dtype == np.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Every image has a bright stroke on a dark background, roughly centred like MNIST's.
    assert (small.train_x.max(axis=(1, 2)) >= 200).all()
    assert 0.05 < float(x.mean()) < 0.35
    border = np.concatenate([x[:, 0, :2].ravel(), x[:, 0, -2:].ravel()])
    assert float(border.mean()) < 0.05


def test_glyphs_vary_within_a_class(small: pd.DigitSet) -> None:
    assert len(pd.glyph_bank()) >= 40  # Hershey + matplotlib TTF styles
    sevens = small.train_x[small.train_y == 7].reshape(20, -1).astype(np.float32)
    assert len({row.tobytes() for row in sevens}) == 20
    # Same class images are more alike than different classes on average (the labels mean something).
    ones = small.train_x[small.train_y == 1].reshape(20, -1).astype(np.float32)
    within = np.abs(sevens[:, None] - sevens[None]).mean()
    across = np.abs(sevens[:, None] - ones[None]).mean()
    assert within < across


def test_odd_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        pd.generate(105, 50)
    with pytest.raises(ConfigError):
        pd.generate(0, 50)


def test_the_generator_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from edge_sdk.tasks import procdigits_data as pd\n"
        "pd.generate(20, 10)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache_and_a_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    first, built = pd.load(*SMALL, seed=0, workers=1, root=tmp_path)
    assert built
    path = pd.cache_path(*SMALL, seed=0, root=tmp_path)
    assert path.is_file() and path.parent == tmp_path and pd.cache_key(*SMALL, 0) in path.name
    again, built = pd.load(*SMALL, seed=0, workers=1, root=tmp_path)
    assert not built
    np.testing.assert_array_equal(again.train_x, first.train_x)
    np.testing.assert_array_equal(again.test_y, first.test_y)

    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the image data
    path.write_bytes(bytes(raw))
    rebuilt, built = pd.load(*SMALL, seed=0, workers=1, root=tmp_path)
    assert built
    np.testing.assert_array_equal(rebuilt.train_x, first.train_x)

    path.write_bytes(path.read_bytes()[:1000])  # truncated
    assert pd.load(*SMALL, seed=0, workers=1, root=tmp_path)[1]
    assert not pd.load(*SMALL, seed=0, workers=1, root=tmp_path)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial files left


def test_cache_name_changes_with_size_and_seed() -> None:
    names = {
        pd.cache_path(*size, seed=seed).name for size in (SMALL, pd.QUICK_SIZE) for seed in (0, 1)
    }
    assert len(names) == 4


# ----------------------------------------------------------------------------- IDX files


def _idx(data: npt.NDArray[np.uint8]) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 0x08, data.ndim)
        + struct.pack(f">{data.ndim}I", *data.shape)
        + data.tobytes()
    )


def test_idx_reader_reads_plain_and_gzipped_files(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx(images))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = pd.read_idx(tmp_path / name)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, images)
    ints = np.array([1, -2, 70_000], dtype=">i4")
    (tmp_path / "i").write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + ints.tobytes())
    assert pd.read_idx(tmp_path / "i").tolist() == [1, -2, 70_000]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00\x08",
        b"\x00\x00\x07\x01\x00\x00\x00\x01x",  # unknown dtype code
        b"\x00\x01\x08\x01\x00\x00\x00\x01x",  # bad magic
        b"\x00\x00\x08\x02\x00\x00\x00\x02",  # header cut short
        b"\x00\x00\x08\x01\x00\x00\x00\x05abc",  # fewer data bytes than the dims say
        b"\x1f\x8b\x08\x00garbage",  # broken gzip
    ],
)
def test_malformed_idx_files_raise_config_errors(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(ConfigError, match="bad"):
        pd.read_idx(tmp_path / "bad")


def _write_mnist(
    directory: Path, *, emnist: bool = False
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        if emnist:
            (directory / f"emnist-digits-{split}-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(_idx(images))
            )
            (directory / f"emnist-digits-{split}-labels-idx1-ubyte").write_bytes(_idx(labels))
        else:
            (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
            (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return images, labels


def test_a_local_mnist_copy_is_used_when_pointed_at(tmp_path: Path) -> None:
    images, labels = _write_mnist(tmp_path)
    digits = pd.build(mnist_dir=tmp_path)
    np.testing.assert_array_equal(digits.train_x, images)
    np.testing.assert_array_equal(digits.test_y, labels.astype(np.int64))
    assert digits.train_y.dtype == np.int64 and digits.source == str(tmp_path)

    emnist = tmp_path / "emnist"
    emnist.mkdir()
    _write_mnist(emnist, emnist=True)
    np.testing.assert_array_equal(pd.load_mnist_dir(emnist).train_x, images.transpose(0, 2, 1))

    with pytest.raises(ConfigError, match="no test-labels"):
        (tmp_path / "t10k-labels-idx1-ubyte").unlink()
        pd.load_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([3, 1, 4, 12], dtype=np.uint8)))
    with pytest.raises(ConfigError, match="labels must be"):
        pd.load_mnist_dir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        pd.load_mnist_dir(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- task


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("torch")
    from edge_sdk.tasks.procdigits import ProcDigitsTask

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECI_HOME", str(tmp_path_factory.mktemp("edgeci-home")))
        mp.delenv("EDGECI_MNIST_DIR", raising=False)
        yield ProcDigitsTask(device="cpu", size=pd.QUICK_SIZE, workers=1)


def test_task_splits_follow_the_declared_contract(task: object) -> None:
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.procdigits import ProcDigitsTask
    from edge_sdk.tasks.registry import TASK_INFO

    assert isinstance(task, ProcDigitsTask)
    assert isinstance(get_task("procdigits", device="cpu"), ProcDigitsTask)
    info = TASK_INFO["procdigits"]
    assert info.spec.fingerprint == task.spec.fingerprint  # the shipped spec is this LeNet-5
    assert task.spec.groups == ("extractor", "classifier")
    assert info.contract is not None and info.contract.shape == task.input_shape == (1, 28, 28)
    data = task.data()
    assert (len(data.pretrain), len(data.pool), len(data.test)) == (100, 1900, 500)
    assert np.bincount(data.pretrain.y).tolist() == [10] * 10
    for split in (data.pretrain, data.pool, data.test):
        np.testing.assert_array_equal(info.contract.batch(split.x), split.x)
    # pretrain and pool partition the training set
    assert not set(map(bytes, data.pretrain.x.reshape(100, -1))) & set(
        map(bytes, data.pool.x.reshape(1900, -1))
    )


def test_fine_tuning_beats_the_weak_deployed_model(task: object) -> None:
    from edge_sdk.tasks.procdigits import ProcDigitsTask

    assert isinstance(task, ProcDigitsTask)
    deployed = task.pretrained(seed=0)
    before = task.evaluate(deployed)["accuracy"]
    assert 0.3 < before < 0.85  # weak, but far better than chance
    pool = task.data().pool
    result = task.local_update(
        deployed, pool.x, pool.y, TrainConfig(epochs=2, batch_size=32, lr=0.05)
    )
    after = task.evaluate(result.weights)["accuracy"]
    assert after > before + 0.08


def test_a_device_without_torch_serves_the_shipped_lenet_graph(task: object) -> None:
    """The shipped ``procdigits-lenet5`` graphs are this model: the declared task's
    onnxruntime features and numpy head round agree with torch."""
    from edge_sdk.tasks.procdigits import ProcDigitsTask
    from edge_sdk.tasks.registry import TASK_INFO, DeclaredTask

    assert isinstance(task, ProcDigitsTask)
    lean = DeclaredTask(TASK_INFO["procdigits"])
    weights = task.pretrained(seed=0)
    pool = task.data().pool
    x, y = pool.x[:32], pool.y[:32]
    np.testing.assert_allclose(lean.features(weights, x), task.features(weights, x), atol=1e-4)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=1, group="classifier")
    got = lean.local_update(weights, x, y, config)
    expected = task.local_update(weights, x, y, config)
    head = task.spec.group_slice("classifier")
    np.testing.assert_array_equal(got.weights[: head.start], weights[: head.start])
    np.testing.assert_allclose(got.weights[head], expected.weights[head], atol=1e-4)
