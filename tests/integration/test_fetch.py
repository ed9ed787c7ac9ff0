"""`emm fetch-data`: mirror copy with checksum verification, file:// download, clear failures."""

from __future__ import annotations

import io
import shutil
import zipfile

import pytest

from emm.data.fetch import fetch_data
from emm.data.spec import resolve_dataset
from emm.errors import EMMError


def test_mirror_copy_verifies_checksums(shared_data, tmp_path):
    report = fetch_data(resolve_dataset("census-income"), tmp_path / "census-income", shared_data)
    assert report == ["train: census-income.data.gz sha256 ok", "test: census-income.test.gz sha256 ok"]
    assert (tmp_path / "census-income" / "census-income.names").exists()


def test_corrupt_mirror_is_refused_and_destination_kept(shared_data, tmp_path):
    mirror = tmp_path / "mirror" / "ali-ccp"
    shutil.copytree(shared_data / "ali-ccp", mirror)
    target = mirror / "ali_ccp_val_sample.csv"
    target.chmod(0o644)
    target.write_text(target.read_text().replace("0.", "1.", 1))
    dest = tmp_path / "data" / "ali-ccp"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("previous contents")
    with pytest.raises(EMMError, match=r"ali_ccp_val_sample\.csv: sha256 of its content is .* expected 1236e150") \
            as err:
        fetch_data(resolve_dataset("ali-ccp"), dest, tmp_path / "mirror")
    # the message names the file that is really bad (the mirror's, not a temporary copy that is gone by now)
    assert str(err.value).startswith(f"mirror file {target}: ")
    assert "replace it with a good copy" in str(err.value).lower() and "delete it" not in str(err.value).lower()
    assert ".tmp-" not in str(err.value)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert [p.name for p in dest.parent.iterdir()] == ["ali-ccp"]


def test_download_from_url_unpacks_and_verifies(shared_data, tmp_path):
    """The download path, exercised with a local file:// URL (tests never touch the network)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in (shared_data / "aliexpress").iterdir():
            zf.write(p, f"nested/{p.name}")
    archive = tmp_path / "ae.zip"
    archive.write_bytes(buf.getvalue())
    spec = resolve_dataset("aliexpress")
    spec = spec.model_copy(update={"download": spec.download.model_copy(update={"url": archive.as_uri()})})
    report = fetch_data(spec, tmp_path / "aliexpress")
    assert report == ["train: aliexpress_train_sample.csv sha256 ok", "test: aliexpress_test_sample.csv sha256 ok"]


def test_no_download_source_says_how(tmp_path):
    with pytest.raises(EMMError, match=r"cannot be downloaded automatically: Needs a Tianchi account"):
        fetch_data(resolve_dataset("ali-ccp"), tmp_path / "ali-ccp")
    assert not (tmp_path / "ali-ccp").exists()


def test_mirror_without_the_files(tmp_path):
    (tmp_path / "mirror").mkdir()
    with pytest.raises(EMMError, match=r"raw file missing: looked for .*census-income\.data"):
        fetch_data(resolve_dataset("census-income"), tmp_path / "c", tmp_path / "mirror")
    assert not (tmp_path / "c").exists()


def test_corrupt_download_names_the_url(shared_data, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in (shared_data / "aliexpress").iterdir():
            data = p.read_bytes()
            zf.writestr(p.name, data.replace(b"0", b"1", 1) if "test" in p.name else data)
    archive = tmp_path / "ae.zip"
    archive.write_bytes(buf.getvalue())
    spec = resolve_dataset("aliexpress")
    spec = spec.model_copy(update={"download": spec.download.model_copy(update={"url": archive.as_uri()})})
    with pytest.raises(EMMError, match=r"aliexpress_test_sample\.csv downloaded from file://.*ae\.zip: sha256 of its "
                                       r"content is .* expected c264673d") as err:
        fetch_data(spec, tmp_path / "aliexpress")
    assert ".tmp-" not in str(err.value) and "Delete it" not in str(err.value)
    assert not (tmp_path / "aliexpress").exists()
