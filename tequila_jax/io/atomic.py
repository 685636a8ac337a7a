"""Files and directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import stat
import tempfile

# How libraries that do their own I/O (safetensors, tensorstore) say ENOSPC.
_DISK_FULL = ("No space left on device", "StorageFull", "os error 28",
              "code: 28")


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (an OSError or a library's wrapper of one) is ENOSPC."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return True
  return any(s in str(error) for s in _DISK_FULL)


def disk_full(path) -> OSError:
  """The error a full disk raises, naming what could not be written."""
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def check_writable(path, *, replace: bool = True) -> None:
  """Refuses a destination that cannot be written (an existing `path` when
  not `replace`, a parent that is not a writable directory) before anything
  is written, with the fix."""
  path = pathlib.Path(path)
  if not replace and path.exists():
    raise FileExistsError(f"{path} exists; write to a new path.")
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent  # the first ancestor that exists is created under
  if not parent.is_dir():
    raise NotADirectoryError(f"cannot write {path}: {parent} is not a "
                             "directory; choose another destination.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write {path}: {parent} is not writable; "
                          "choose another destination or fix its "
                          "permissions.")


@contextlib.contextmanager
def atomic_path(path, *, directory: bool = False, replace: bool = True):
  """Yields a temporary sibling of `path` (an empty directory if `directory`,
  else a file name) to write into; when the block completes it is renamed
  onto `path`, when it raises it is deleted and `path` is untouched.

  `replace=False` refuses an existing `path` before anything is written. An
  existing directory is replaced (it is removed just before the rename).
  The result has the permissions a plain `open()` / `mkdir()` would give it
  (an existing file's mode, else the umask's), not the temporary's 0600 /
  0700; a full disk is raised as `OSError(ENOSPC)` naming `path`, whatever
  library wrote.
  """
  path = pathlib.Path(path)
  check_writable(path, replace=replace)
  path.parent.mkdir(parents=True, exist_ok=True)
  prefix = f".{path.name}."
  if path.exists() and not directory:
    mode = stat.S_IMODE(path.stat().st_mode)
  else:
    mode = (0o777 if directory else 0o666) & ~_umask()
  try:
    if directory:
      tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    else:
      fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix)
      os.close(fd)
      tmp = pathlib.Path(name)
  except OSError as e:
    if is_disk_full(e):
      raise disk_full(path) from e
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise PermissionError(
          f"cannot write {path} ({e.strerror}): choose another destination "
          "or fix its permissions.") from e
    raise
  try:
    yield tmp
    os.chmod(tmp, mode)
    if directory and path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException as e:
    if tmp.is_dir():
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      tmp.unlink(missing_ok=True)
    if isinstance(e, Exception) and is_disk_full(e):
      raise disk_full(path) from e
    raise
