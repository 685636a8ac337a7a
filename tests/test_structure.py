"""The package's shape: imports point one way (down a declared order of
modules), none is hidden in a function to dodge that order, light entry
points load no heavy stack, and every documented command starts from an
installed wheel."""

import ast
import re
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from tests.cli import ROOT

PACKAGE = ROOT / "tequila_jax"
COMMANDS = ("train", "data", "export", "evaluate", "generate", "analyze",
            "lm_eval_adapter")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(), str(p))
          for p in PACKAGE.rglob("*.py")}


def _targets(node, known) -> list[str]:
  """The package modules an import statement names."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif node.module and node.level == 0:
    names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
             else node.module for a in node.names]
  else:
    names = []
  return [n for n in names if n in known]


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports at module level."""
  modules = _modules()
  return {name: {t for node in tree.body
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 for t in _targets(node, modules)}
          for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = "done"
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


# Every module of the package, lowest first: a module may import only modules
# before it in this list ("*.__main__" covers every command's entry point).
# The groups, from the bottom:
ORDER = (
    # Leaves: import nothing of the package (the top level is lazy: a module
    # `__getattr__`; `io/__init__` is a docstring).
    "tequila_jax", "tequila_jax.errors", "tequila_jax.io",
    "tequila_jax.io.atomic", "tequila_jax.io.tokenizers", "tequila_jax.losses",
    "tequila_jax.sharding",
    # What every command's `__main__` imports (errors only), and a workdir's
    # files (no JAX).
    "tequila_jax.cli", "tequila_jax.workdir",
    # Numerics: the pure-JAX quantizers, then the model (Flax) and what
    # trains it.
    "tequila_jax.quant.config", "tequila_jax.quant.activations",
    "tequila_jax.quant.ternary", "tequila_jax.quant.learned",
    "tequila_jax.quant.sherry",
    "tequila_jax.quant.state", "tequila_jax.quant.matmul", "tequila_jax.quant",
    "tequila_jax.layers", "tequila_jax.model", "tequila_jax.sampling",
    "tequila_jax.optim", "tequila_jax.diagnostics", "tequila_jax.distill",
    # Model and tokenizer formats, and what a location string names.
    "tequila_jax.io.assets", "tequila_jax.io.tqj", "tequila_jax.io.hf",
    "tequila_jax.io.gguf", "tequila_jax.io.locations",
    # Corpora -> documents -> tokenized corpus -> batches (no Flax).
    "tequila_jax.data.corpora.texts", "tequila_jax.data.corpora",
    "tequila_jax.data.sources", "tequila_jax.data.corpus",
    "tequila_jax.data.pipeline", "tequila_jax.data",
    # Training: configs, checkpoints, metrics, opening models, the trainer.
    "tequila_jax.configs", "tequila_jax.config_lib", "tequila_jax.configs.tiny",
    "tequila_jax.configs.smollm2_135m", "tequila_jax.configs.llama1b",
    "tequila_jax.configs.llama3b",
    "tequila_jax.checkpoint", "tequila_jax.metrics", "tequila_jax.io.load",
    "tequila_jax.train.step", "tequila_jax.train.build",
    "tequila_jax.train.resume", "tequila_jax.train.loop", "tequila_jax.train",
    # Inference, evaluation and analysis.
    "tequila_jax.inference.kernels", "tequila_jax.inference.settings",
    "tequila_jax.inference.cache", "tequila_jax.inference.model",
    "tequila_jax.inference.loading", "tequila_jax.inference",
    "tequila_jax.evaluate",
    "tequila_jax.lm_eval_adapter", "tequila_jax.analyze",
    # Commands (`python -m tequila_jax.X`): nothing imports them.
    "tequila_jax.export", "tequila_jax.generate", "*.__main__",
)


def rank(module: str) -> int | None:
  """`module`'s place in ORDER (None: not declared)."""
  for i, entry in enumerate(ORDER):
    if module == entry or (entry == "*.__main__" and
                           module.endswith(".__main__")):
      return i
  return None


def order_violations(graph: dict[str, set[str]]) -> list[str]:
  """An import of a module that is not below the importer in ORDER, and
  every module ORDER does not declare."""
  out = [f"{m}: not in tests/test_structure.py ORDER; declare its rank"
         for m in sorted(graph) if rank(m) is None]
  out += [f"{m} imports {t}, which is not below it in ORDER"
          for m in sorted(graph) for t in sorted(graph[m])
          if None not in (rank(m), rank(t)) and rank(t) >= rank(m)]
  return out


def test_imports_point_down_the_declared_order():
  graph = import_graph()
  assert graph["tequila_jax.io.gguf"] >= {"tequila_jax.io.tqj",
                                          "tequila_jax.io.tokenizers"}
  assert order_violations(graph) == []
  assert not [t for m, ts in graph.items() if m.startswith("tequila_jax.io")
              for t in ts if t.startswith("tequila_jax.inference")]


def test_the_order_check_finds_a_planted_violation():
  graph = {m: set(ts) for m, ts in import_graph().items()}
  before = set(order_violations(graph))
  graph["tequila_jax.cli"].add("tequila_jax.train.loop")  # upward
  graph["tequila_jax.data.sources"].add("tequila_jax.data.corpus")  # across
  graph["tequila_jax.new_module"] = set()
  assert sorted(set(order_violations(graph)) - before) == [
      "tequila_jax.cli imports tequila_jax.train.loop, which is not below it "
      "in ORDER",
      "tequila_jax.data.sources imports tequila_jax.data.corpus, which is not "
      "below it in ORDER",
      "tequila_jax.new_module: not in tests/test_structure.py ORDER; declare "
      "its rank"]
  assert rank("tequila_jax.train.__main__") == len(ORDER) - 1


def test_the_package_has_no_import_cycle():
  # Implied by the order; kept for the message: the cycle itself.
  graph = import_graph()
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# Module `__getattr__`s that import on first use, by design (PEP 562).
LAZY_IMPORTERS = {"tequila_jax.__getattr__", "tequila_jax.quant.__getattr__"}


def _imports_ours(node) -> bool:
  if isinstance(node, ast.ImportFrom):
    return bool(node.module) and node.module.startswith("tequila_jax")
  if isinstance(node, ast.Import):
    return any(a.name.startswith("tequila_jax") for a in node.names)
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module")  # importlib, any target


def test_no_package_import_inside_a_function():
  """Imports of our own modules sit at the top of the file: one hidden in a
  function body is how an import cycle gets dodged instead of removed. The
  lazy top levels are the exceptions, by name."""
  hidden = []
  for name, tree in _modules().items():
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
          f"{name}.{node.name}" not in LAZY_IMPORTERS):
        hidden += [f"{name}:{inner.lineno}" for inner in ast.walk(node)
                   if _imports_ours(inner)]
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef):
        hidden += [f"{name}:{inner.lineno}" for inner in ast.walk(node)
                   if _imports_ours(inner)]
  assert not hidden, hidden
  assert {f"{m}.__getattr__" for m in ("tequila_jax", "tequila_jax.quant")
          } == LAZY_IMPORTERS


_PROBE = """
import sys
import {module}
heavy = [m for m in {heavy!r} if m in sys.modules]
assert not heavy, heavy
"""


@pytest.mark.parametrize("module, heavy", [
    ("tequila_jax.quant", ("flax", "jax")),  # lazy: jax on first use
    ("tequila_jax.quant.config", ("jax",)),
    ("tequila_jax.quant.matmul", ("flax", "orbax.checkpoint")),
    ("tequila_jax.cli", ("jax", "tequila_jax.train")),
    ("tequila_jax.workdir", ("jax", "orbax.checkpoint")),
    ("tequila_jax.data", ("flax", "tequila_jax.io.load", "tequila_jax.model")),
    ("tequila_jax.analyze", ("matplotlib.pyplot",)),
    ("experiments.sweep", ("jax",)),
])
def test_light_modules_load_no_heavy_stack(module, heavy):
  out = subprocess.run([sys.executable, "-c", _PROBE.format(
      module=module, heavy=heavy)], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]


def test_the_lazy_top_levels_give_every_name():
  out = subprocess.run([sys.executable, "-c", (
      "import tequila_jax, tequila_jax.quant as q\n"
      "from tequila_jax import QuantConfig, TernaryDense\n"
      "assert sorted(q.__all__) == sorted(q._LAZY)\n"
      "assert all(getattr(q, n) is not None for n in q.__all__)\n"
      "assert q.learned.lam_value and QuantConfig is q.QuantConfig\n"
      "assert set(dir(tequila_jax)) >= set(tequila_jax.__all__)")],
      capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory):
  """A venv holding only the built wheel of tequila_jax; its dependencies
  come from this interpreter's site-packages as a plain path (so that the
  checkout's editable install is not visible)."""
  tmp = tmp_path_factory.mktemp("wheel")
  source = tmp / "source"  # a copy: building in the checkout litters it
  shutil.copytree(PACKAGE, source / "tequila_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
                  str(source)], check=True, capture_output=True)
  venv.create(tmp / "venv", with_pip=False)
  python = tmp / "venv" / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print("
                         "sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  (pathlib.Path(site) / "deps.pth").write_text(
      sysconfig.get_paths()["purelib"] + "\n")
  wheel = next((tmp / "dist").glob("tequila_jax-*.whl"))
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python),
                  "install", "--no-deps", "-q", str(wheel)], check=True,
                 capture_output=True)
  return python, tmp


def test_every_command_starts_from_an_installed_wheel(wheel_python):
  python, cwd = wheel_python
  where = subprocess.run(
      [str(python), "-c", "import tequila_jax; print(tequila_jax.__file__)"],
      capture_output=True, text=True, cwd=cwd, check=True).stdout
  assert str(ROOT) not in where and "site-packages" in where
  env = {"PATH": "/usr/bin:/bin", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  for command in COMMANDS:
    out = subprocess.run([str(python), "-m", f"tequila_jax.{command}",
                          "--help"], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=300)
    # absl's --help exits 1 after printing; a failed import exits 1 too,
    # with a traceback and no help.
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, (
        command, out.stderr[-2000:])
    assert "--help" in out.stdout or "--model" in out.stdout, command
  # The default config is found inside the installed package.
  out = subprocess.run([str(python), "-m", "tequila_jax.train", "--dry_run"],
                       capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"params": 134515008' in out.stdout


def _layout_block() -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index("## Layout")
  return text[text.index("```", start) + 3:text.index("```\n", text.index(
      "```", start) + 3)]


def test_the_readme_layout_matches_the_tree():
  """Every path the README's Layout names exists, and it names every module
  and package of tequila_jax (a package's modules by file name)."""
  block = _layout_block()
  named = set(re.findall(r"[\w./]+(?:\.py|/)", block))
  missing = sorted(p for p in named if "/" in p.rstrip("/") or p.endswith("/")
                   if p.startswith(("tequila_jax/", "experiments/", "configs/",
                                    "notebooks/", "tests/", "docs/"))
                   and not (ROOT / p).exists())
  assert not missing, f"the Layout names paths that do not exist: {missing}"
  unnamed = []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    if path.name in ("__init__.py", "__main__.py") or rel.parts[0] == "configs":
      continue
    words = {f"{path.name}", f"tequila_jax/{rel.as_posix()}"}
    if not words & named:
      unnamed.append(rel.as_posix())
  for path in sorted(p for p in PACKAGE.rglob("*") if p.is_dir()
                     and p.name != "__pycache__"):
    rel = path.relative_to(PACKAGE).as_posix()
    if not {f"{path.name}/", f"tequila_jax/{rel}/"} & named:
      unnamed.append(rel + "/")
  assert not unnamed, f"the README's Layout does not name: {unnamed}"


def test_ci_runs_the_readme_test_command_on_pinned_versions():
  """`.ci/run` ends with the README's test command; both README install
  commands use constraints.txt, which pins every package it names exactly."""
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"^python -m pip install .*$", readme, re.M)
  assert len(commands) == 2, commands
  assert all("-c constraints.txt" in c for c in commands), commands
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci in commands and ci.endswith("python -m pytest"), ci
  pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
          if line and not line.startswith("#")]
  loose = [p for p in pins if not re.fullmatch(r"[\w.\-\[\]]+==[\w.]+", p)]
  assert not loose, f"constraints.txt lines that are not exact pins: {loose}"
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
               "numpy", "torch", "transformers"):
    assert any(p.lower().startswith(name + "==") for p in pins), name
