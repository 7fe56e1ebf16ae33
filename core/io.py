"""Atomic file writes shared by every stage that leaves something in a run directory.

Every writer here writes to a temporary file in the target's own directory and then
``os.replace``-s it over the target, so a reader (or a crashed run) never sees a
half-written file, and no temporary file is left behind when the write fails.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_figure",
    "to_jsonable",
    "write_json",
]


def _current_umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:  # Linux: read it, no race with other threads
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : str or PathLike
        Target file; missing parent directories are created.
    data : bytes
        Complete new content.

    Returns
    -------
    Path
        The target path.

    Notes
    -----
    The data goes to a hidden temporary file in the same directory, is flushed and
    fsync-ed, and then replaces the target with :func:`os.replace`. The new file keeps
    the mode of the file it replaces, or gets the usual ``0o666 & ~umask``.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(
    path: str | os.PathLike[str], text: str, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation).

    Parameters
    ----------
    path : str or PathLike
        Target file; missing parent directories are created.
    text : str
        Complete new content.
    encoding : str
        Text encoding, UTF-8 by default.

    Returns
    -------
    Path
        The target path.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_figure(
    fig: Any, path: str | os.PathLike[str], dpi: int = 120, **savefig_kwargs: Any
) -> Path:
    """Save a matplotlib figure atomically.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure; it is not closed.
    path : str or PathLike
        Target file; the format comes from its suffix (``.png`` when it has none).
    dpi : int
        Resolution in dots per inch.
    **savefig_kwargs
        Passed on to :meth:`~matplotlib.figure.Figure.savefig` (e.g. ``bbox_inches``).

    Returns
    -------
    Path
        The target path.
    """
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"cannot save a figure as {fmt!r} ({path}); supported: {', '.join(sorted(supported))}"
        )
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, **savefig_kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON-compatible Python values.

    numpy (and torch) arrays and scalars become lists / Python numbers, NaN and
    infinities become ``None``, paths become strings, dataclasses and mappings become
    dicts, tuples and sets become lists, enums become their value, dates ISO strings.

    Raises
    ------
    TypeError
        For an object with no sensible JSON form.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("utf-8", errors="replace")
    # numpy arrays / scalars and torch tensors: tolist() yields plain Python values.
    detach = getattr(obj, "detach", None)
    if callable(detach):
        obj = detach().cpu()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    # numpy complex or other number-likes
    if isinstance(obj, complex):
        raise TypeError(f"complex value {obj!r} is not JSON serialisable")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _json_key(key: Any) -> Any:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int)):
        return key
    if isinstance(key, float):
        return key if math.isfinite(key) else str(key)
    item = getattr(key, "item", None)
    if callable(item):  # numpy scalar key
        return _json_key(item())
    if isinstance(key, enum.Enum):
        return _json_key(key.value)
    return str(key)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically.

    Parameters
    ----------
    path : str or PathLike
        Target file; missing parent directories are created.
    obj : Any
        Anything :func:`to_jsonable` accepts (numpy arrays and scalars included);
        NaN and infinities are written as ``null``.
    indent : int
        Indentation, 2 by default.

    Returns
    -------
    Path
        The target path.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")
