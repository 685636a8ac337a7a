"""The cost of checkpoint integrity (`tequila_jax.checkpoint`'s fingerprints):
save and restore time of a config's full train state with and without it,
side by side in one process, alternating, medians and ranges.

    python -m experiments.bench_checkpoint --config configs/smollm2_135m.py \
        --reps 5 --out experiments/results/checkpoint_integrity

The state is the config's, randomly initialized (`init.checkpoint` is not
read: the sizes are what matter), on this host's first device; saves are
synchronous so that the timed span is the whole write (the fingerprints are
computed on a thread beside it; an asynchronous save would hide the write
but not them, since `save` returns when they are done). "The fingerprints
alone" times `state_fingerprints` on the state by itself. The machine's
load average is recorded: on a shared machine it moves every time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time

import jax

from experiments import common
from tequila_jax import checkpoint, config_lib, data
from tequila_jax.io import locations
from tequila_jax.train.build import build_train


def _stats(xs: list[float]) -> dict:
  return dict(median=statistics.median(xs), min=min(xs), max=max(xs),
              runs=[round(x, 3) for x in xs])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/smollm2_135m.py")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default="")
  parser.add_argument("--tmp", default="", help="Directory to write into.")
  args = parser.parse_args(argv)

  config = config_lib.load_config_file(args.config)
  config.init.checkpoint = ""
  config.data.tokenizer = "bytes"  # the data iterator's position only
  config.mesh.update(data=1, fsdp=1)
  config.train.batch_size = 1
  tr = build_train(config, devices=jax.devices()[:1])
  state = tr.init_state()
  jax.block_until_ready(state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  abstract = tr.abstract_state()

  root = pathlib.Path(tempfile.mkdtemp(dir=args.tmp or None))
  corpus_config = config_lib.tiny()
  corpus_config.data.cache_dir = str(root / "corpora")
  corpus = data.prepare_for_config(
      corpus_config, locations.load_tokenizer, progress=False)
  load = [os.getloadavg()[0]]
  times = {f"{what}_{kind}": [] for what in ("save", "restore")
           for kind in ("with", "without")}
  fingerprints = {name: [] for name in checkpoint.FINGERPRINTS}
  try:
    for rep in range(args.reps + 1):  # the first round compiles: not counted
      for integrity in ((True, False) if rep % 2 else (False, True)):
        kind = "with" if integrity else "without"
        workdir = root / f"{kind}{rep}"
        it = data.train_iterator(corpus, seq_len=64, batch_size=1, seed=0)
        ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1,
                                       async_save=False, integrity=integrity)
        t0 = time.perf_counter()
        ckpt.save(1, state, it, force=True)
        ckpt.wait()
        t1 = time.perf_counter()
        restored, _ = ckpt.restore(1, abstract, it)
        jax.block_until_ready(restored)
        t2 = time.perf_counter()
        ckpt.close()
        del restored
        shutil.rmtree(workdir)
        if rep:
          times[f"save_{kind}"].append(t1 - t0)
          times[f"restore_{kind}"].append(t2 - t1)
      for name, fingerprint in checkpoint.FINGERPRINTS.items():
        t0 = time.perf_counter()
        fingerprint(state)
        if rep:
          fingerprints[name].append(time.perf_counter() - t0)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  load.append(os.getloadavg()[0])

  result = dict(config=args.config, algorithm=checkpoint.FINGERPRINT,
                commit=common.git_commit(), state_bytes=state_bytes,
                leaves=len(jax.tree.leaves(state)), reps=args.reps,
                device=str(jax.devices()[0]), platform=platform.platform(),
                cpus=os.cpu_count(), load_average=[round(x, 2) for x in load],
                fingerprints_s=_stats(fingerprints[checkpoint.FINGERPRINT]),
                fingerprints_by_algorithm_s={
                    k: _stats(v) for k, v in fingerprints.items()},
                **{k: _stats(v) for k, v in times.items()})
  for what in ("save", "restore"):
    result[f"{what}_overhead"] = (result[f"{what}_with"]["median"]
                                  / result[f"{what}_without"]["median"] - 1)
  print(json.dumps(result, indent=2))
  if args.out:
    rows = "\n".join(
        f"| {what} | {result[f'{what}_without']['median']:.2f} "
        f"({result[f'{what}_without']['min']:.2f}-"
        f"{result[f'{what}_without']['max']:.2f}) | "
        f"{result[f'{what}_with']['median']:.2f} "
        f"({result[f'{what}_with']['min']:.2f}-"
        f"{result[f'{what}_with']['max']:.2f}) | "
        f"{100 * result[f'{what}_overhead']:+.1f}% |"
        for what in ("save", "restore"))
    common.write_results(
        args.out, result, f"# Checkpoint integrity cost: {args.config}\n\n"
        f"Train state {state_bytes / 2**20:.0f} MiB in {result['leaves']} "
        f"arrays (params, AdamW, diagnostics), random init; fingerprints "
        f"`{checkpoint.FINGERPRINT}`; {args.reps} alternating repetitions "
        f"after one warm-up, synchronous saves, {result['device']} "
        f"({os.cpu_count()} CPUs, {platform.platform()}; load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end), commit "
        f"{result['commit'][:12]}. Seconds, median (min-max):\n\n"
        "| | without | with fingerprints | change |\n"
        f"|---|---|---|---|\n{rows}\n\nThe fingerprints alone, each "
        "algorithm a checkpoint may carry (the first is written, the others "
        "still verify): " + ", ".join(
            f"`{name}` {t['median']:.2f} s ({t['min']:.2f}-{t['max']:.2f})"
            for name, t in result["fingerprints_by_algorithm_s"].items())
        + ".\n\n"
        f"`python -m experiments.bench_checkpoint --config {args.config} "
        f"--reps {args.reps} --out {args.out}`\n")


if __name__ == "__main__":
  common.command(main)
