"""`python -m tequila_jax.analyze --workdir DIR [--compare DIR2,DIR3]`:
deadzone plots and a summary table (see `tequila_jax.analyze`)."""

from absl import flags

from tequila_jax import analyze, cli

flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
flags.DEFINE_list("compare", [], "Further workdirs, side by side.")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/analysis).")
flags.DEFINE_list("hist_steps", None, "Steps whose |W|/delta histograms to "
                  "plot (default: first and last logged).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  steps = [int(s) for s in FLAGS.hist_steps] if FLAGS.hist_steps else None
  out = analyze.analyze([FLAGS.workdir, *FLAGS.compare], FLAGS.out, steps)
  print((out / "summary.md").read_text())
  print(f"plots in {out}")


if __name__ == "__main__":
  cli.run(main)
