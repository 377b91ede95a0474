"""The official archives of the image datasets: locating their files, downloading and verifying them.

Nothing is downloaded unless a reader is called with ``download=True``. An archive is fetched with
:func:`fetch` (plain ``urllib``), checked against its published md5 and extracted with
``tarfile``'s ``"data"`` filter (no absolute paths, links out of the folder or device files).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Archive:
    """An official dataset archive.

    Attributes:
        description: what the archive is called by its authors, for error messages.
        url: where to download it.
        md5: hex md5 digest of the archive file.
        folder: the top-level folder the archive extracts to.
    """

    description: str
    url: str
    md5: str
    folder: str

    @property
    def filename(self) -> str:
        """The archive's file name, the last part of its URL."""
        return self.url.rsplit("/", 1)[-1]


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        "the 'CIFAR-10 python version' archive",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": Archive(
        "the 'CIFAR-100 python version' archive",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
    "stl10": Archive(
        "the 'STL-10 binary' archive",
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "91f7769df0f17e558f3565bffb0c7dfb",
        "stl10_binary",
    ),
}


def fetch(url: str, destination: Path) -> None:
    """Download ``url`` to the file ``destination``."""
    with urllib.request.urlopen(url) as response, destination.open("wb") as file:
        shutil.copyfileobj(response, file)


def md5sum(path: Path) -> str:
    """Hex md5 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_archive(archive: Archive, root: Path) -> None:
    """Fetch ``archive`` into ``root`` (unless a verified copy is there already) and extract it into ``root``.

    The download goes to ``<root>/<filename>.part`` and is renamed once its md5 matches.

    Raises:
        ValueError: if the downloaded file's md5 is not ``archive.md5`` (the partial file is deleted).
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / archive.filename
    if not path.is_file() or md5sum(path) != archive.md5:
        partial = path.with_name(path.name + ".part")
        fetch(archive.url, partial)
        digest = md5sum(partial)
        if digest != archive.md5:
            partial.unlink()
            raise ValueError(
                f"the file downloaded from {archive.url} has md5 {digest}, expected {archive.md5} "
                f"({archive.description}); it was deleted, try again"
            )
        partial.replace(path)
    with tarfile.open(path) as tar:
        tar.extractall(root, filter="data")


def locate_files(archive: Archive, root: str | Path, names: Sequence[str], *, download: bool) -> list[Path]:
    """Paths of the files ``names`` inside ``<root>/<archive.folder>``, downloading the archive if asked and needed.

    Raises:
        FileNotFoundError: saying which file was expected where, and from which archive.
    """
    root = Path(root).expanduser()
    paths = [root / archive.folder / name for name in names]
    if download and not all(path.is_file() for path in paths):
        download_archive(archive, root)
    for path in paths:
        if not path.is_file():
            hint = "" if download else "; pass download=True (revnets train: --download) to fetch it"
            raise FileNotFoundError(
                f"expected {path} ({archive.description} {archive.filename}, extracted into {root}){hint}"
            )
    return paths
