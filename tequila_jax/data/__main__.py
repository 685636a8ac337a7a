"""`python -m tequila_jax.data --config configs/X.py`: tokenize the config's
corpus once into the cache (progress bar) and print where it is."""

import json

from absl import flags
from ml_collections import config_flags

from tequila_jax import cli, data
from tequila_jax.io import locations

config_flags.DEFINE_config_file("config", None, "Training config file "
                                "(`path.py[:arg]`).", lock_config=True)
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  config = flags.FLAGS.config
  corpus = data.prepare_for_config(config, locations.load_tokenizer)
  print(corpus)
  print(json.dumps(data.read_meta(corpus), indent=2))


if __name__ == "__main__":
  cli.run(main)
