"""The MNIST IDX reader, against the real files and against broken ones."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

from secondorder.bench.mnist import (
    IDXFormatError,
    MNISTNotFoundError,
    available_splits,
    load_mnist,
    load_mnist_images,
    read_idx,
)

# $SECONDORDER_MNIST_DIR, else ../shared/data/mnist beside the repository
MNIST_DIR = Path(
    os.environ.get(
        "SECONDORDER_MNIST_DIR",
        Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist",
    )
)
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR} (expected beside the repository)",
)


def _idx(array: torch.Tensor, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.numpy().astype(">u1" if type_code == 0x08 else ">i4").tobytes()


@needs_mnist
def test_real_t10k_split() -> None:
    images, labels = load_mnist(MNIST_DIR, "t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert set(labels.tolist()) == set(range(10))
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert available_splits(MNIST_DIR) == ["t10k"]


@needs_mnist
def test_raw_and_gz_give_the_same_tensor(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((MNIST_DIR / (name + ".gz")).read_bytes()))
    raw_images, raw_labels = load_mnist(tmp_path, "t10k")
    gz_images, gz_labels = load_mnist(MNIST_DIR, "t10k")
    assert torch.equal(raw_images, gz_images) and torch.equal(raw_labels, gz_labels)


def test_train_split_is_read_and_preferred(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 9], dtype=torch.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(images))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images[:2]))
    got_images, got_labels = load_mnist(tmp_path, "train")
    assert torch.equal(got_images, images) and got_labels.tolist() == [0, 1, 2, 3, 9]
    assert available_splits(tmp_path) == ["train", "t10k"]


def test_other_idx_types_are_decoded_big_endian(tmp_path: Path) -> None:
    values = torch.tensor([[1, -2, 70000]], dtype=torch.int32)
    (tmp_path / "x.idx").write_bytes(_idx(values, 0x0C))
    assert read_idx(tmp_path / "x.idx").tolist() == [[1, -2, 70000]]


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-1], "truncated data"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b[:3], "too short"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b"\x08\x03" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX data type"),
        (lambda b: b[:3] + b"\x00" + b[4:], "zero dimensions"),
        (lambda b: gzip.compress(b)[:-12], "gzip"),
        (lambda b: gzip.compress(b)[:-8] + b"\xff" * 8, "gzip"),
    ],
)
def test_broken_files_raise_a_clear_value_error(tmp_path: Path, mangle, message) -> None:
    good = _idx(torch.zeros(3, 28, 28, dtype=torch.uint8))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(mangle(good))
    with pytest.raises(ValueError, match=message) as info:
        load_mnist_images(tmp_path, "t10k")
    assert isinstance(info.value, IDXFormatError)
    assert str(path) in str(info.value)


def test_wrong_shape_and_label_range_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(torch.zeros(2, 8, 8, dtype=torch.uint8)))
    with pytest.raises(IDXFormatError, match=r"\[N, 28, 28\]"):
        load_mnist_images(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        _idx(torch.zeros(2, 28, 28, dtype=torch.uint8))
    )
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        _idx(torch.tensor([1, 12], dtype=torch.uint8))
    )
    with pytest.raises(IDXFormatError, match="outside 0..9"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(torch.tensor([1], dtype=torch.uint8)))
    with pytest.raises(IDXFormatError, match="1 labels for 2 images"):
        load_mnist(tmp_path)


def test_missing_files_name_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(tmp_path / "nowhere", "t10k")
    text = str(info.value)
    assert "t10k-images-idx3-ubyte[.gz]" in text and "t10k-labels-idx1-ubyte[.gz]" in text
    assert "does not exist" in text and isinstance(info.value, FileNotFoundError)
    with pytest.raises(ValueError, match="valid splits: train, t10k"):
        load_mnist(tmp_path, "test")
