"""The package's shape: no import cycles, no imports hidden in functions to
dodge one, and every documented command starts from an installed wheel."""

import ast
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


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert graph["tequila_jax.io.gguf"] >= {"tequila_jax.io.tqj",
                                          "tequila_jax.io.tokenizers"}
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_package_import_inside_a_function():
  """Imports of our own modules sit at the top of the file: one hidden in a
  function body is how an import cycle gets dodged instead of removed."""
  hidden = []
  for name, tree in _modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if (isinstance(inner, ast.ImportFrom) and inner.module
              and inner.module.startswith("tequila_jax")) or (
                  isinstance(inner, ast.Import) and any(
                      a.name.startswith("tequila_jax") for a in inner.names)):
            hidden.append(f"{name}:{inner.lineno}")
  assert not hidden, hidden


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
