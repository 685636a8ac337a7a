"""What a resumed run may change, and how the rest is refused.

A workdir that holds a run keeps what the run computes from: its config,
its corpus's identity and, when distilling, its teacher's (`record` writes
them once the state is restored). A command that resumes it is checked
against them before anything is written:

- `check_config`: a field that is not a `RUN_TIME_FIELDS` one differs;
- `check_layout`: the train state has other shapes than the checkpoints';
- `check_teacher`: the teacher is missing, or its files or shapes differ;
- `check_corpus`: a source file was edited, added or removed.

Each refusal is one line, what differs and then the fixes.
`train.allow_config_change` lets a run change its config, teacher or corpus
on purpose (with a warning); nothing lets it reshape a checkpoint or
distill from a teacher that is not there.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import ml_collections

from tequila_jax import checkpoint, config_lib, data
from tequila_jax import workdir as workdir_lib
from tequila_jax.model import RunSettings
from tequila_jax.train.build import Train

log = logging.getLogger("tequila_jax")

# Sections a resumed run may change as a whole: the device mesh (how the
# state is laid out) and the diagnostics (what is measured, not trained).
RUN_TIME_SECTIONS = ("mesh", "diagnostics")
# RunSettings fields that a resume refuses all the same: the compute dtype
# changes the numerics (bf16 or fp32 matmuls and activations), so a resumed
# run would go on computing another function than the one it checkpointed.
# (Like remat or scan, it is still never stored with the weights.)
NUMERIC_RUN_SETTINGS = ("dtype",)

# Fields a resumed run may change: how it runs, not what it computes (a
# name ending in "." is a whole section).
RUN_TIME_FIELDS = (
    *(f"model.{f.name}" for f in dataclasses.fields(RunSettings)
      if f.name not in NUMERIC_RUN_SETTINGS),
    *(f"{section}.{name}" for section, fields in
      config_lib.RUN_TIME_DEFAULTS.items() for name in fields),
    *(f"{section}." for section in RUN_TIME_SECTIONS))


def _flat(tree, prefix="") -> dict:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items()
          for k, v in _flat(sub, f"{prefix}{key}.").items()}


def _normal(value):
  """JSON's view of a value (a stored config is read back from JSON)."""
  return list(map(_normal, value)) if isinstance(value, (list, tuple)) else value


def config_changes(stored: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict) -> list[str]:
  """`field: stored -> new` for every field of `config` that differs from a
  run's `stored` config and is not a run-time field (fields the stored
  config lacks, from an older version, compare as their defaults)."""
  defaults = _flat(config_lib.base_config().to_dict())
  old = {**defaults, **_flat(stored.to_dict())}
  new = _flat(config.to_dict())
  return [f"{k}: {old[k]!r} -> {v!r}" for k, v in sorted(new.items())
          if k in old and _normal(old[k]) != _normal(v)
          and not any(k == f or (f.endswith(".") and k.startswith(f))
                      for f in RUN_TIME_FIELDS)]


def _unless_allowed(config: ml_collections.ConfigDict, refusal: str,
                    purpose: str, change: str, detail: str) -> None:
  """Refuses the resume with `refusal` (what differs, then its own fix)
  unless `train.allow_config_change`, which logs the `change` instead."""
  if not config.train.allow_config_change:
    raise ValueError(f"{refusal}, train in another --workdir, or pass "
                     f"--config.train.allow_config_change=True to {purpose} "
                     "on purpose.")
  log.warning("resuming %s (train.allow_config_change): %s", change, detail)


def check_config(config: ml_collections.ConfigDict, workdir) -> None:
  """Refuses to resume the run in `workdir` with a config that changes what
  it computes (any field but `RUN_TIME_FIELDS`; `model.dtype` included),
  unless `train.allow_config_change`."""
  if not workdir_lib.is_workdir(workdir):
    return
  changes = config_changes(workdir_lib.read_config(workdir), config)
  if changes:
    _unless_allowed(
        config, f"{workdir} holds a run whose config differs in what it "
        f"computes: {'; '.join(changes)}. Resume with its config (drop these "
        "overrides)", "change them", "with a changed config",
        "; ".join(changes))


def check_layout(workdir, abstract_state: dict) -> None:
  """Refuses a train state of other shapes than the checkpoints in
  `workdir` (`allow_config_change` cannot reshape them): a config error,
  so no checkpoint is set aside as damaged."""
  if not workdir_lib.is_workdir(workdir):
    return
  diff = checkpoint.layout_differences(workdir, abstract_state,
                                       ignore=("diag",))
  if diff:
    raise ValueError(
        f"the checkpoints in {workdir} hold a train state of another shape "
        f"than this config's: {'; '.join(diff[:3])}"
        f"{'; ...' if len(diff) > 3 else ''}. Resume with the run's own "
        "model config (allow_config_change cannot reshape a checkpoint), or "
        "train in another --workdir.")


def teacher_source(tr: Train) -> dict:
  """Which teacher a run distills from and the hash of its files' content
  keys (`data.fingerprint`, as the corpus cache keys its sources; a demo
  asset is pinned by its name). The initial-weights teacher has no file and
  no hash."""
  location = tr.teacher_location
  if not location:
    return dict(teacher=f"initial weights (seed {tr.config.seed})",
                content_hash=None)
  return dict(teacher=location,
              content_hash=data.content_hash(data.fingerprint(location)))


def _teacher_record(tr: Train) -> dict:
  """What the workdir keeps of the run's teacher (loading it): its source
  and its parameters' shapes."""
  shapes = {jax.tree_util.keystr(path): list(x.shape) for path, x in
            jax.tree_util.tree_flatten_with_path(tr.teacher.params)[0]}
  return {**teacher_source(tr), "shapes": shapes}


def _missing(location: str) -> bool:
  """Whether a model location names a path that is not there."""
  return bool(location) and not location.startswith("asset:") and not (
      pathlib.Path(location).expanduser().exists())


def check_teacher(tr: Train, workdir) -> dict | None:
  """Checks a distilling run's teacher against the one the run in `workdir`
  recorded (`teacher.json`): refused if it is missing, and, unless
  `train.allow_config_change`, if its content hash or shapes differ. Loads
  it (refusing early) to compare or record its shapes. Returns the record
  `record` is to write (None: the workdir keeps its own)."""
  if tr.distill is None:
    return None
  stored = workdir_lib.read_teacher(workdir)
  if stored is None:
    return _teacher_record(tr)
  was = (f"{workdir} was distilled from the teacher {stored['teacher']!r} "
         f"(content hash {stored['content_hash']}), but")
  if _missing(tr.teacher_location):
    raise ValueError(
        f"{was} {tr.teacher_location!r} is missing (moved or deleted). "
        "Restore it there, point --config.distill.teacher to where it is now "
        "and pass --config.train.allow_config_change=True (its new paths "
        "change its content hash), or train in another --workdir.")
  now = teacher_source(tr)
  problem = None
  if now["content_hash"] != stored["content_hash"]:
    problem = (f"{now['teacher']!r} now has content hash "
               f"{now['content_hash']} (its files changed)")
  else:
    shapes = _teacher_record(tr)["shapes"]
    diff = [f"{k} {stored['shapes'].get(k)} -> {v}" for k, v in shapes.items()
            if stored["shapes"].get(k) != v]
    diff += [f"{k} missing" for k in stored["shapes"] if k not in shapes]
    if diff:
      problem = f"its parameters differ in shape: {', '.join(diff[:3])}"
  if problem is None:
    return None
  _unless_allowed(tr.config, f"{was} {problem}. Restore that teacher",
                  "change teachers", "with another teacher", problem)
  return _teacher_record(tr)


def check_corpus(config: ml_collections.ConfigDict, workdir,
                 corpus: pathlib.Path) -> None:
  """Refuses to resume on a corpus other than the one the run trained on
  (a source file edited, added or removed since: "resumes exactly" would
  no longer hold), unless `train.allow_config_change`."""
  stored = workdir_lib.read_corpus(workdir) if workdir_lib.is_workdir(
      workdir) else None
  now = data.corpus_id(corpus)
  if stored is None or stored["key"] == now["key"]:
    return
  changed = data.changed_inputs(stored["inputs"], now["inputs"])
  _unless_allowed(
      config, f"{workdir} trained on another corpus: {changed}. Resume on "
      "the same files (restore them)", "continue on this corpus",
      "on a changed corpus", changed)


def record(workdir, config: ml_collections.ConfigDict, corpus: pathlib.Path,
           teacher: dict | None) -> None:
  """Writes what the checks compare a later resume with: the config, the
  corpus's identity and the teacher's record (`check_teacher`'s, if any).
  Called once the state is restored, so a refused or failed start leaves
  the workdir's own."""
  workdir_lib.write_config(workdir, config)
  workdir_lib.write_corpus(workdir, data.corpus_id(corpus))
  if teacher is not None:
    workdir_lib.write_teacher(workdir, teacher)
