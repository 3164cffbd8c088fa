"""File helpers with no heavy imports (usable from the napari process): atomic writes, same-file checks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "read_json_object", "same_file"]


def _current_umask() -> int:
    try:  # Linux reports it without changing it (os.umask would briefly change it for every thread)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file: the same inode when both exist (links and other
    spellings included), else the same resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` for a temporary file in ``path``'s folder, then rename it to ``path``.

    The rename is atomic on POSIX, so readers never see half a file; on failure the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``: a sidecar, a record or a config that medsegkit or a tool wrote.

    Raises:
        ValueError: one line, ``"{what} {path} ..."``, when the file is not JSON or holds something other than
            an object, ending with ``fix`` (what the user can do).
    """
    from medsegkit._serialize import json_kind

    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} holds a JSON {json_kind(data)}, expected an object; {fix}")
    return data


def check_new_output(path: str | os.PathLike, overwrite: bool, what: str) -> Path:
    """``path`` as a ``Path``, if a ``what`` (``"JSON report"``, ``"PNG file"``) may be written there: not a
    folder (``IsADirectoryError``), and not an existing file unless ``overwrite`` (``FileExistsError``)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of the {what} to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    return path
