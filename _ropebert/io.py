"""Writing outputs without losing anything: a command's output directory is written aside and swapped in whole.

`OutputDir(out, ...)` is a context manager that yields a fresh temporary sibling of `out`. When the block
finishes, the sibling (plus an optional marker file listing what was written) replaces `out` by rename; when it
fails (bad input, a crash, a full disk) the sibling is removed and `out` is untouched. A non-empty `out` is only
replaced with `overwrite=True` and only when every entry in it is one this command produced (`owned(out)`:
recognised by its manifest or marker); `out` equal to or inside the command's source is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError, UserError


def no_space_message(e: OSError, writing: os.PathLike | str) -> str:
    where = getattr(e, "filename", None) or writing
    return f"no space left on device writing {where}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove temporary siblings `.NAME.tmp-PID-*` / `.NAME.old-PID-*` left by a killed run of this code (their PID
    no longer runs). Returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        parts = p.name[len(out.name) + 2:].split("-")
        if len(parts) >= 3 and parts[0] in ("tmp", "old") and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it and rename it over `path`: a reader sees the old
    or the new content, never a truncated file (kill -9, full disk). The temporary file never outlives a failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UserError(no_space_message(e, path)) from None
        raise


def marker_owned(marker: str) -> Callable[[Path], Optional[set]]:
    """`owned` for outputs that carry a JSON marker {"files": [...]}: the marker and the entries it lists."""

    def owned(d: Path) -> Optional[set]:
        m = d / marker
        if not m.is_file():
            return None
        try:
            files = json.loads(m.read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError):
            return None
        return set(files or []) | {marker} if isinstance(files, list) else None

    return owned


def check_not_inside(out: Path, source: Optional[os.PathLike | str], what: str) -> None:
    """Refuse an output directory equal to or inside the command's source (file sources: their directory)."""
    if source is None:
        return
    src = Path(source).resolve()
    src_dir = src.parent if src.is_file() else src
    o = out.resolve()
    if o == src_dir or src_dir in o.parents:
        raise InputError(f"{what}: --out {out} is {'the source directory' if o == src_dir else 'inside the source'} "
                         f"{src_dir}; write the output elsewhere (the source is never replaced)")


class OutputDir:
    def __init__(self, out: os.PathLike | str, *, what: str, overwrite: bool = False,
                 source: Optional[os.PathLike | str] = None, marker: Optional[str] = None,
                 owned: Optional[Callable[[Path], Optional[set]]] = None, marker_info: Optional[dict] = None):
        self.out = Path(out)
        self.what, self.overwrite, self.source = what, overwrite, source
        self.marker, self.marker_info = marker, dict(marker_info or {})
        self.owned = owned or (marker_owned(marker) if marker else None)
        self.tmp: Optional[Path] = None

    def check(self) -> None:
        out = self.out
        check_not_inside(out, self.source, self.what)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{self.what}: {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not self.overwrite:
                raise FileExistsError(f"{self.what}: output directory {out} is not empty (pass --overwrite to replace "
                                      f"a previous {self.what} output)")
            owned = self.owned(out) if self.owned else None
            if owned is None:
                raise FileExistsError(f"{self.what}: refusing to --overwrite {out}: it is not the output of a previous "
                                      f"{self.what} (no {self.marker or 'manifest'} recognised there)")
            foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
            if foreign:
                raise FileExistsError(f"{self.what}: refusing to --overwrite {out}: it holds {len(foreign)} entr"
                                      f"{'y' if len(foreign) == 1 else 'ies'} {self.what} did not write (e.g. "
                                      f"{foreign[:3]}); move them or choose another --out")

    def __enter__(self) -> Path:
        self.check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(self.out)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            raise UserError(f"{self.what}: cannot create a directory beside {self.out}: {e.strerror}") from None
        return self.tmp

    def _disk_error(self, e: BaseException) -> Optional[UserError]:
        """The one-line error for a full or read-only disk (None for anything else)."""
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return UserError(f"{self.what}: {no_space_message(e, self.out)} (nothing was replaced)")
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES):
            return UserError(f"{self.what}: cannot write {getattr(e, 'filename', None) or self.out}: {e.strerror}")
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        failed_here = None
        if exc_type is None:
            try:
                if self.marker:
                    files = sorted(p.name for p in self.tmp.iterdir())
                    (self.tmp / self.marker).write_text(
                        json.dumps({**self.marker_info, "files": files}, indent=1) + "\n", encoding="utf-8")
                self._swap()
                return False
            except OSError as e:
                exc = failed_here = e
        shutil.rmtree(self.tmp, ignore_errors=True)
        err = self._disk_error(exc)
        if err is not None:
            raise err from None
        if failed_here is not None:
            raise failed_here
        return False

    def commit(self, tmp: Path) -> None:
        """Swap a directory the caller filled itself (e.g. a restartable work directory beside `out`) in as
        `out`, after the same checks; the no-space / read-only errors are one line, and `tmp` is kept."""
        self.tmp = Path(tmp)
        try:
            self._swap()
        except OSError as e:
            err = self._disk_error(e)
            if err is not None:
                raise err from None
            raise

    def _swap(self) -> None:
        out, tmp = self.out, self.tmp
        if out.is_dir():
            self.check()  # still ours (nothing was added meanwhile)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
