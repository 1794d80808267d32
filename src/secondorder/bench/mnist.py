"""Reading MNIST from the original IDX files (gzip-compressed or raw).

IDX layout (big-endian): two zero bytes, one type byte, one byte giving the number of
dimensions ``k``, then ``k`` unsigned 32-bit sizes, then the data in row-major order. MNIST
ships four such files per data set; ``train-*`` (60,000 examples) and ``t10k-*`` (10,000).

Every malformed input raises :class:`IDXFormatError` (a ``ValueError``) naming the file and
what is wrong with it; missing files raise :class:`MNISTNotFoundError` (a
``FileNotFoundError``) naming the files that were expected.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import torch

SPLITS = ("train", "t10k")

# IDX type byte -> torch dtype of the (big-endian) values; torch only, no numpy needed
_IDX_TYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated, or not an IDX file at all."""


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are not where they were looked for."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise IDXFormatError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (raw or gzip-compressed, detected by content) into a tensor."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            f"{path}: bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero "
            "bytes, a type byte and a dimension count)"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise IDXFormatError(f"{path}: unknown IDX data type 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(
            f"{path}: truncated header ({len(data)} bytes, {header_len} needed for {ndim} dims)"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_TYPES[type_code]
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    found = len(data) - header_len
    if found < expected:
        raise IDXFormatError(
            f"{path}: truncated data: shape {shape} needs {expected} bytes, found {found}"
        )
    if found > expected:
        raise IDXFormatError(
            f"{path}: {found - expected} unexpected trailing bytes after the {shape} array"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data[header_len:]), dtype=torch.uint8)
    if itemsize > 1 and sys.byteorder == "little":  # IDX is big-endian: reverse each value
        raw = raw.view(-1, itemsize).flip(1).contiguous().view(-1)
    return raw.view(dtype).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        candidate = data_dir / name
        if candidate.is_file():
            return candidate
    return None


def expected_files(split: str) -> tuple[str, str]:
    """The file stems (without the optional ``.gz``) of one split: images, labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits: {', '.join(SPLITS)}")
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def available_splits(data_dir: str | os.PathLike[str]) -> list[str]:
    """The splits whose image file is present in ``data_dir`` (train first)."""
    d = Path(data_dir)
    return [s for s in SPLITS if _find(d, expected_files(s)[0]) is not None]


def _missing(data_dir: Path, stems: list[str]) -> MNISTNotFoundError:
    names = " and ".join(f"{s}[.gz]" for s in stems)
    where = "does not exist" if not data_dir.is_dir() else "does not contain them"
    return MNISTNotFoundError(
        f"MNIST files not found: expected {names} in {data_dir} (the directory {where}). "
        "Pass the directory holding the IDX files with --data-dir."
    )


def load_mnist_images(data_dir: str | os.PathLike[str], split: str = "t10k") -> torch.Tensor:
    """The ``[N, 28, 28]`` uint8 images of one split."""
    d = Path(data_dir)
    stem = expected_files(split)[0]
    path = _find(d, stem)
    if path is None:
        raise _missing(d, [stem])
    images = read_idx(path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise IDXFormatError(
            f"{path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    return images


def load_mnist(
    data_dir: str | os.PathLike[str], split: str = "t10k"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 (0..9) of one split."""
    d = Path(data_dir)
    stems = list(expected_files(split))
    paths = [_find(d, s) for s in stems]
    if any(p is None for p in paths):
        raise _missing(d, stems)
    images = load_mnist_images(d, split)
    labels = read_idx(paths[1])
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise IDXFormatError(
            f"{paths[1]}: expected a 1-d uint8 label array, got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if labels.numel() != images.shape[0]:
        raise IDXFormatError(
            f"{paths[1]}: {labels.numel()} labels for {images.shape[0]} images in {paths[0]}"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise IDXFormatError(f"{paths[1]}: label {int(labels.max())} is outside 0..9")
    return images, labels.long()
