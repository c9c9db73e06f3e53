"""Dataset files that cannot be read, and an explicit data_dir: one error naming the file, never a fall-back."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from admmcompress.data.augment import Augment
from admmcompress.data.datasets import DataFileError, find_dataset, load_dataset
from admmcompress.data.files import ENV_VAR, REPO_ROOT, Split, read_npz, search_dirs, whole_number
from admmcompress.data.fsdd import load_fsdd
from admmcompress.data.ptb import load_ptb


def _mnist_like(folder: Path, n: int = 6, **overrides) -> Path:
    """A small mnist.npz (uint8 images, int labels) in ``folder``; ``overrides`` replace arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n) % 10,
        "x_test": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n) % 10,
    }
    arrays.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mnist.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


# --- damaged files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:40], id="header-only"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: np.random.default_rng(1).bytes(len(b)), id="random-bytes"),
        pytest.param(lambda b: b[:600] + bytes(x ^ 0xFF for x in b[600:700]) + b[700:], id="flipped-payload"),
        pytest.param(lambda b: b"\x93NUMPY" + np.random.default_rng(2).bytes(200), id="npy-magic-garbage"),
    ],
)
def test_a_damaged_npz_is_one_line_naming_the_file(tmp_path, damage):
    path = _mnist_like(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFileError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    message = _one_line(err, path)
    assert "replace it with a good copy of mnist.npz" in message


def test_a_npz_without_the_arrays_names_them(tmp_path):
    path = _mnist_like(tmp_path, x_test=None)
    assert len(load_dataset("mnist", "train", data_dir=tmp_path)) == 6  # the train split is all there
    with pytest.raises(DataFileError) as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert "lacks the array(s) ['x_test']" in _one_line(err, path)


def test_arrays_of_the_wrong_shape_are_refused(tmp_path):
    path = _mnist_like(tmp_path, y_train=np.arange(5))  # 6 images, 5 labels
    with pytest.raises(DataFileError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert "images (N, H, W) of uint8 pixels with N integer labels" in _one_line(err, path)


def test_a_single_npy_array_under_the_npz_name_is_refused(tmp_path):
    path = tmp_path / "mnist.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataFileError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert "single array" in _one_line(err, path)


def test_a_pickled_object_array_is_refused_not_unpickled(tmp_path):
    path = _mnist_like(tmp_path, y_train=np.array([object()] * 6, dtype=object))
    with pytest.raises(DataFileError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    _one_line(err, path)


def test_damaged_fsdd_and_ptb_files_are_one_line(tmp_path):
    for name in ("fsdd.npz", "ptb.npz"):
        (tmp_path / name).write_bytes(os.urandom(500))
    with pytest.raises(DataFileError) as err:
        load_fsdd("train", data_dir=tmp_path)
    _one_line(err, tmp_path / "fsdd.npz")
    with pytest.raises(DataFileError) as err:
        load_ptb(data_dir=tmp_path)
    _one_line(err, tmp_path / "ptb.npz")


def test_ptb_text_that_is_not_utf8_is_refused(tmp_path):
    bad = np.frombuffer(b"\xff\xfe words", dtype=np.uint8)
    np.savez(tmp_path / "ptb.npz", train=bad, valid=bad, test=bad)
    with pytest.raises(DataFileError, match="not UTF-8") as err:
        load_ptb(data_dir=tmp_path)
    _one_line(err, tmp_path / "ptb.npz")


def test_fsdd_arrays_that_do_not_fit_together_are_refused(tmp_path):
    np.savez(
        tmp_path / "fsdd.npz", audio=np.zeros(100, np.int16), offsets=np.array([0, 50, 100]),
        labels=np.array([1, 2, 3]), is_test=np.array([False, True]), sample_rate=np.array(8000),
    )
    with pytest.raises(DataFileError) as err:
        load_fsdd("train", data_dir=tmp_path)
    _one_line(err, tmp_path / "fsdd.npz")


def test_a_damaged_cifar_jpeg_names_the_image(tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="JPEG")
    good = np.frombuffer(buffer.getvalue(), np.uint8)
    bad = np.frombuffer(b"not a jpeg at all", np.uint8)
    jpegs = np.concatenate([good, bad])
    offsets = np.array([0, len(good), len(jpegs)])
    np.savez(tmp_path / "cifar10_jpeg.npz", x_train_jpeg=jpegs, train_offsets=offsets, y_train=np.array([1, 2]))
    assert len(load_dataset("cifar10", "train", data_dir=tmp_path, limit=1)) == 1  # the good image decodes
    with pytest.raises(DataFileError, match="image 1 cannot be decoded") as err:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    _one_line(err, tmp_path / "cifar10_jpeg.npz")


def test_read_npz_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(DataFileError, match="nowhere.npz"):
        read_npz(tmp_path / "nowhere.npz", ["a"], "mnist")


# --- an explicit data_dir ----------------------------------------------------------------------------


def test_an_explicit_data_dir_without_the_dataset_is_an_error_not_a_fall_back(tmp_path):
    assert find_dataset("mnist")  # a copy exists in the default places...
    with pytest.raises(FileNotFoundError) as err:  # ...but the folder asked for has none
        load_dataset("mnist", "test", data_dir=tmp_path)
    message = _one_line(err, tmp_path)
    assert "has no mnist.npz" in message and "remove data_dir" in message


def test_a_data_dir_that_does_not_exist_or_is_a_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_dataset("mnist", tmp_path / "nowhere")
    path = _mnist_like(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        find_dataset("mnist", path)  # the file itself given as the folder


def test_a_relative_data_dir_is_shown_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        find_dataset("mnist", "data")
    assert f"'data' ({tmp_path / 'data'})" in str(err.value)


def test_the_env_variable_and_default_places_still_apply_without_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert search_dirs() == [tmp_path, REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]
    assert search_dirs(tmp_path / "mine") == [tmp_path / "mine"]
    path = _mnist_like(tmp_path)
    assert find_dataset("mnist") == path


def test_every_split_names_the_file_it_came_from(tmp_path):
    path = _mnist_like(tmp_path)
    split = load_dataset("mnist", "train", data_dir=tmp_path, limit=4)
    assert split.source == path and split.subset(2).source == path
    assert len(split) == 4
    assert Split(torch.zeros(1, 1), torch.zeros(1)).source is None  # in-memory data has none


# --- numbers from numpy/torch ------------------------------------------------------------------------


def test_numpy_and_torch_integers_are_whole_numbers_booleans_are_not():
    assert whole_number(np.int64(3)) == 3 and type(whole_number(np.int64(3))) is int
    assert whole_number(torch.tensor(2)) == 2
    assert isinstance(whole_number(np.bool_(True)), np.bool_) and whole_number(True) is True
    assert whole_number(2.5) == 2.5 and whole_number("2") == "2"
    assert Augment(shift=np.int64(2)) == Augment(shift=2)
    with pytest.raises(ValueError, match="augment.shift"):
        Augment(shift=np.bool_(True))
    with pytest.raises(ValueError, match="augment.shift"):
        Augment(shift=torch.tensor(True))


def test_a_limit_on_a_class_sorted_split_warns(tmp_path):
    """The CIFAR-10 test file is sorted by class (its first 1,000 images are class 0); a limit there says so."""
    import warnings

    import numpy as np
    import pytest

    from admmcompress.data import load_dataset

    images = np.zeros((40, 28, 28), np.uint8)
    shuffled = np.tile([3, 1, 4, 0, 5, 9, 2, 6, 8, 7], 4)
    for name, labels in (("sorted", np.repeat(np.arange(10), 4)), ("shuffled", shuffled)):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(folder / "mnist.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.warns(RuntimeWarning, match=r"first 8 samples hold only classes \[0, 1\] of 10 \(the file is sorted"):
        load_dataset("mnist", "test", tmp_path / "sorted", limit=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("mnist", "test", tmp_path / "shuffled", limit=8)  # 8 classes of 10, not sorted: no warning
        load_dataset("mnist", "test", tmp_path / "sorted")  # no limit


def test_a_limit_above_the_split_size_is_said_and_the_whole_split_used(tmp_path):
    folder = tmp_path / "data"
    _mnist_like(folder, n=6)
    with pytest.warns(RuntimeWarning, match=r"mnist train: the limit 600 is more than its 6 samples; all 6 are used"):
        split = load_dataset("mnist", "train", folder, limit=600)
    assert len(split.y) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset("mnist", "test", folder, limit=6).y) == 6  # exactly the size: no note


def _rewrite_member(path: Path, member: str, data: bytes, compress_type: int | None = None) -> None:
    import zipfile

    with zipfile.ZipFile(path) as z:
        others = {n: z.read(n) for n in z.namelist() if n != member}
    with zipfile.ZipFile(path, "w") as z:
        for name, content in others.items():
            z.writestr(name, content)
        z.writestr(member, data)
    if compress_type is not None:  # patch the stored method id (zipfile cannot write one it cannot read)
        raw = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            at = raw.find(signature)
            while at != -1:
                raw[at + offset: at + offset + 2] = compress_type.to_bytes(2, "little")
                at = raw.find(signature, at + 4)
        path.write_bytes(bytes(raw))


def test_a_header_claiming_more_than_the_member_holds_is_refused_before_allocating(tmp_path):
    path = _mnist_like(tmp_path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)})
    _rewrite_member(path, "x_train.npy", header.getvalue() + b"\0" * 100)
    with pytest.raises(DataFileError, match=r"claims shape \(1000000000, 28, 28\) of uint8") as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    _one_line(err, path)


def test_a_member_stored_with_a_compression_method_zipfile_lacks_is_one_line(tmp_path):
    path = _mnist_like(tmp_path)
    _rewrite_member(path, "x_train.npy", path.read_bytes()[:0] + b"x" * 64, compress_type=99)
    with pytest.raises(DataFileError) as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    _one_line(err, path)


def test_float_images_and_float_offsets_are_refused_not_rescaled(tmp_path):
    path = _mnist_like(tmp_path, x_train=np.random.default_rng(0).random((6, 28, 28), dtype=np.float32))
    with pytest.raises(DataFileError, match="of uint8 pixels") as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    _one_line(err, path)
    np.savez(
        tmp_path / "fsdd.npz", audio=np.zeros(100, np.int16), offsets=np.array([0.0, 50.0, 100.0]),
        labels=np.array([1, 2]), is_test=np.array([False, True]), sample_rate=np.array(8000),
    )
    with pytest.raises(DataFileError, match="integer offsets"):
        load_fsdd("train", data_dir=tmp_path)


def test_a_cifar_jpeg_of_another_size_is_named_by_its_index(tmp_path):
    from PIL import Image

    parts = []
    for size in (32, 32, 64):
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (10, 20, 30)).save(buffer, format="JPEG")
        parts.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(p) for p in parts])
    np.savez(tmp_path / "cifar10_jpeg.npz", x_train_jpeg=np.concatenate(parts), train_offsets=offsets,
             y_train=np.array([1, 2, 3]))
    with pytest.raises(DataFileError, match="image 2 is 64x64, not 32x32 as image 0") as err:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    _one_line(err, tmp_path / "cifar10_jpeg.npz")
