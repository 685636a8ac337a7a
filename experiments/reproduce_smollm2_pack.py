"""What the SmolLM2 reproduction needs on a GPU machine, packed in parts
that travel one device call each (`python -m experiments.reproduce_smollm2
pack`; experiments/results/reproduce_smollm2/README.md has the device
commands that unpack them)."""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import subprocess
import sys

from tequila_jax.io import locations

# What the device's Python lacks, pinned to the versions the runs used.
DEVICE_WHEELS = ("grain==0.2.18", "array-record==0.8.1", "portpicker",
                 "ml-collections==1.1.0", "gguf==0.19.0", "tensorboardX==2.6.5")


def pack(out: pathlib.Path, dest: pathlib.Path, init: str,
         part_bytes: int = 48 << 20) -> None:
  """What a GPU machine needs, in parts that travel one call each (64 MiB
  a call, code included): 1/ the corpus and cloze items (tar.xz) and the
  wheels it lacks, then the GGUF split in `part_bytes` pieces with its
  sha256 in the last part."""
  if dest.exists():
    shutil.rmtree(dest)
  first = dest / "1"
  (first / "wheels").mkdir(parents=True)
  subprocess.run(["tar", "-C", str(out), "-cJf", str(first / "corpus.tar.xz"),
                  "corpus", "cloze.jsonl"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                  "--no-deps", "--only-binary=:all:", "--python-version",
                  "3.12", "--implementation", "cp", "--platform",
                  "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                  "--platform", "manylinux2014_x86_64", "-d",
                  str(first / "wheels"), *DEVICE_WHEELS], check=True)
  gguf = locations.resolve(init)
  blob = gguf.read_bytes()
  parts = [blob[i:i + part_bytes] for i in range(0, len(blob), part_bytes)]
  for i, part in enumerate(parts):
    folder = dest / str(i + 2)
    folder.mkdir()
    (folder / f"gguf.part{i}").write_bytes(part)
  (dest / str(len(parts) + 1) / "gguf.sha256").write_text(
      hashlib.sha256(blob).hexdigest() + "\n")
  for folder in sorted(dest.iterdir()):
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 2**20:.1f} MiB")
