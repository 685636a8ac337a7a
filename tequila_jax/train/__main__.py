"""`python -m tequila_jax.train --config configs/X.py[:arg] [--config.k=v] --workdir DIR`

Only flag parsing lives here; the training logic is `tequila_jax.train.run`,
importable from notebooks. Without `--config` it runs the embedded default:
QAT continuation of the real SmolLM2-135M on Shakespeare (about half an
hour on a 2-core CPU), printing held-out perplexity before and after.
"""

import json
import logging
import pathlib

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from tequila_jax import cli, configs, train

config_flags.DEFINE_config_file(
    "config", str(configs.DEFAULT), "Training config file (`path.py[:arg]`).",
    lock_config=True)
flags.DEFINE_bool("dry_run", False, "Print parameter count and train-state "
                  "memory per device for the config's mesh, allocate nothing.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here "
                    "(default: runs/<config name>).")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty
  logging.getLogger("tequila_jax").setLevel(logging.INFO)
  config = flags.FLAGS.config
  if flags.FLAGS.dry_run:
    print(json.dumps(train.describe(config), indent=2))
    return
  workdir = flags.FLAGS.workdir or str(
      pathlib.Path("runs") / pathlib.Path(
          flags.FLAGS["config"].config_filename.split(":")[0]).stem)
  summary = train.run(config, workdir)
  print(json.dumps(summary, indent=2))
  return train.exit_code(summary)  # 143 / 130 when a signal stopped it


if __name__ == "__main__":
  cli.run(main)
