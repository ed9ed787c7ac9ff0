"""Fill ``data/<dataset>/`` with raw files: from a local mirror folder, or the official source.

Why a mirror first: machines without network (like CI here) must still reproduce the pipeline; the
mirror is copied file by file and checked against the declared checksums, exactly as a download is.
The folder is filled atomically: on any error the previous contents stay and nothing half-copied remains.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from emm.data.reader import resolve_file
from emm.data.spec import DatasetSpec
from emm.errors import EMMError
from emm.io import atomic_dir


def content_sha256(path: Path) -> str:
    """sha256 of the file's content, decompressed when it is gzip (declared checksums are of content)."""
    opener = gzip.open if path.suffix == ".gz" else open
    digest = hashlib.sha256()
    try:
        with opener(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except (OSError, EOFError) as exc:
        raise EMMError(f"{path}: cannot be read ({exc}); is it truncated?") from exc
    return digest.hexdigest()


def verify(spec: DatasetSpec, folder: Path, *, came_from: Path | str | None = None,
           dest: Path | None = None) -> list[str]:
    """Check that every declared file is present and matches its declared checksum; returns a report.

    ``came_from``: when ``folder`` is the temporary copy that ``fetch_data`` fills, the mirror folder (a
    Path) or the URL (a str) its files came from. A mismatch then names the file the user can fix, not
    the copy, which is deleted with the failed fetch; ``dest`` is the folder the fetch left untouched.
    """
    report = []
    for key, names in spec.files.items():
        path = resolve_file(folder, names)
        base = path.name.removesuffix(".gz")
        expected = spec.sha256.get(base)
        if expected is None:
            report.append(f"{key}: {path.name} (no checksum declared)")
            continue
        actual = content_sha256(path)
        if actual != expected:
            raise EMMError(_mismatch(spec, path, f"sha256 of its content is {actual}, expected {expected}",
                                     came_from, dest))
        report.append(f"{key}: {path.name} sha256 ok")
    return report


def _mismatch(spec: DatasetSpec, path: Path, what: str, came_from: Path | str | None, dest: Path | None) -> str:
    kept = f"; {dest} was left as it was" if dest is not None else ""
    if came_from is None:
        return (f"{path}: {what}; the file is corrupt or a different version. Delete it and fetch it again "
                f"(`emm fetch-data {spec.name}`).")
    if isinstance(came_from, Path):
        official = spec.download.url if spec.download and spec.download.url else "see the dataset's download notes"
        return (f"mirror file {came_from / path.name}: {what}; the mirror's copy is corrupt or a different version. "
                f"Replace it with a good copy (official source: {official}) and run `emm fetch-data {spec.name} "
                f"--mirror ...` again{kept}.")
    return (f"{path.name} downloaded from {came_from}: {what}; the download was damaged or the source now serves "
            f"another version. Run `emm fetch-data {spec.name}` again; if the new version is intended, update its "
            f"sha256 in the dataset declaration{kept}.")


def fetch_data(spec: DatasetSpec, dest: Path, mirror: Path | None = None) -> list[str]:
    """Copy (mirror) or download (official source) the raw files of ``spec`` into ``dest``."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        if mirror is not None:
            came_from: Path | str = _copy_mirror(spec, Path(mirror), tmp)
        else:
            came_from = _download(spec, tmp)
        report = verify(spec, tmp, came_from=came_from, dest=dest)
    return report


def _copy_mirror(spec: DatasetSpec, mirror: Path, tmp: Path) -> Path:
    """Copy the mirror's files into ``tmp``; returns the folder they came from."""
    source = mirror / spec.name if (mirror / spec.name).is_dir() else mirror
    if not source.is_dir():
        raise EMMError(f"mirror folder {mirror} does not exist")
    resolve_file(source, spec.files["train"])  # a clear error if the mirror lacks the data
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, tmp / path.name)  # not copy2: keep our own (writable) mode
    return source


def _download(spec: DatasetSpec, tmp: Path) -> str:
    """Download and unpack the official archive into ``tmp``; returns its URL."""
    if spec.download is None or spec.download.url is None:
        how = spec.download.instructions if spec.download else "no official download is declared."
        raise EMMError(f"dataset {spec.name!r} cannot be downloaded automatically: {how}")
    archive = tmp / ".download"
    try:
        with urllib.request.urlopen(spec.download.url, timeout=60) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        raise EMMError(f"download of {spec.download.url} failed ({exc}); without network, pass --mirror DIR "
                       f"with a local copy of the raw files") from exc
    _unpack(archive, tmp)
    archive.unlink()
    return spec.download.url


def _unpack(archive: Path, dest: Path) -> None:
    """Extract every member (zip/tar, nested archives too) flat into ``dest``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                if not member.is_dir():
                    target = dest / Path(member.filename).name
                    with zf.open(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                    _maybe_nested(target, dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile():
                    src = tf.extractfile(member)
                    assert src is not None
                    target = dest / Path(member.name).name
                    with open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
    else:
        raise EMMError(f"downloaded file is neither zip nor tar: {archive}")


def _maybe_nested(path: Path, dest: Path) -> None:
    if path.suffixes[-2:] == [".tar", ".gz"] or path.suffix == ".tgz" or path.suffix == ".zip":
        _unpack(path, dest)
        path.unlink()
