"""Files and directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path, *, directory: bool = False, replace: bool = True):
  """Yields a temporary sibling of `path` (an empty directory if `directory`,
  else a file name) to write into; when the block completes it is renamed
  onto `path`, when it raises it is deleted and `path` is untouched.

  `replace=False` refuses an existing `path` before anything is written. An
  existing directory is replaced (it is removed just before the rename).
  """
  path = pathlib.Path(path)
  if not replace and path.exists():
    raise FileExistsError(f"{path} exists; write to a new path.")
  path.parent.mkdir(parents=True, exist_ok=True)
  prefix = f".{path.name}."
  if directory:
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
  else:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    os.close(fd)
    tmp = pathlib.Path(name)
  try:
    yield tmp
    if directory and path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    if tmp.is_dir():
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      tmp.unlink(missing_ok=True)
    raise
