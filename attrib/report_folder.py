"""Writing a report folder without ever touching what attrib did not write.

The report is built in a hidden staging folder beside ``--out`` and renamed into place when it is
complete, so a report folder is either complete or absent. The folder carries a manifest
(:data:`MANIFEST`) listing every file attrib wrote into it. An existing ``--out`` is replaced only
when it is a folder whose manifest says attrib wrote it and that holds nothing else; anything
else (a file, a link, the current folder, a folder of the user's, a report the user added files
to) is refused with an :class:`~attrib.errors.InputError` before any work starts. SIGTERM and
SIGHUP are turned into :class:`Terminated` (a ``KeyboardInterrupt``), so the staging folder is
removed on ``kill`` as on Ctrl-C.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError

MANIFEST = ".attrib-report.json"
TOOL = "attrib report"


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP; ``signum`` says which.

    >>> with termination_as_interrupt():   # SIGTERM/SIGHUP now raise Terminated (a KeyboardInterrupt)
    ...     run()
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _handlers(numbers: tuple[int, ...], handler) -> Iterator[None]:
    """``handler`` for the signals ``numbers`` within the block, the previous handlers restored after
    (outside the main thread signals are not ours to handle: nothing changes)."""
    previous = {}
    try:
        for number in numbers:
            previous[number] = signal.signal(number, handler)
    except ValueError:
        pass
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def termination_as_interrupt():
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (previous handlers restored)."""
    def handler(signum, frame):
        raise Terminated(signum)

    return _handlers((signal.SIGTERM, signal.SIGHUP), handler)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done, so the swap of the folders and the
    clean-up are never cut in half: their handlers only note the signal (Python runs handlers in
    the main thread, whichever thread the kernel delivered the signal to), and the interrupt is
    raised when the block ends."""
    noted: list[int] = []
    with _handlers((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), lambda signum, frame: noted.append(signum)):
        yield
    if noted:
        raise KeyboardInterrupt if noted[0] == signal.SIGINT else Terminated(noted[0])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("tool") == TOOL and isinstance(data.get("files"), dict):
        return data
    return None


def _refuse(out: Path, why: str) -> InputError:
    return InputError(f"--out: {out} {why}; attrib only replaces a report folder it wrote itself, so choose another "
                      "path or remove it yourself")


def check_out(path: str | os.PathLike) -> Path:
    """The absolute ``--out`` path, or an InputError when attrib must not write or replace there."""
    out = Path(os.path.abspath(path))
    here = Path.cwd().resolve()
    if out.is_symlink():
        raise _refuse(out, "is a symbolic link")
    for above in out.parents:
        if _manifest(above) is not None:
            raise _refuse(out, f"is inside {above}, a report folder attrib wrote (which would then hold files that are "
                               "not its own)")
    if out.exists():
        if not out.is_dir():
            raise _refuse(out, "is a file")
        if here == out.resolve() or out.resolve() in here.parents:
            raise _refuse(out, "is the current folder or holds it")
        manifest = _manifest(out)
        if manifest is None:
            raise _refuse(out, f"exists and was not written by attrib (no {MANIFEST} in it)")
        written = manifest["files"]
        extra = sorted(set(_contents(out)) - set(written))
        if extra:
            raise _refuse(out, f"holds files attrib did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
        changed = [name for name, digest in written.items() if digest is not None and
                   (not (out / name).is_file() or _digest(out / name) != digest)]
        if changed:
            raise _refuse(out, f"holds files changed since attrib wrote them ({', '.join(changed[:3])})")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"--out: cannot replace {out}: it is not writable (permission denied)")
    parent = out.parent
    for folder in [parent, *parent.parents]:  # the nearest existing ancestor must be a writable folder
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"--out: {folder} is a file, so no folder can be made under it")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(f"--out: cannot write in {folder} (permission denied)")
            break
    return out


def _contents(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (relative, '/'-separated), the manifest excluded."""
    names = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if relative != MANIFEST:
                names.append(relative)
    return sorted(names)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; the ones created, deepest first."""
    missing = [f for f in [folder, *folder.parents] if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``out`` (made at once, so an unwritable place is refused before
    any work); on success it gets a manifest (every file with its SHA-256), normal permissions and
    replaces ``out`` (checked again, just before, with :func:`check_out`); on any exception,
    KeyboardInterrupt and :class:`Terminated` included, it is removed, with any parent folders it
    had to create, and ``out`` is untouched."""
    created: list[Path] = []
    try:
        created = _make_parents(out.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        _remove_empty(created)
        raise InputError(f"--out: cannot create a folder in {out.parent}: {error.strerror or error}") from None
    try:
        yield staging
        files = {name: (_digest(staging / name) if (staging / name).is_file() else None) for name in _contents(staging)}
        (staging / MANIFEST).write_text(json.dumps({"tool": TOOL, "files": files}, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700
        try:
            with _signals_held():
                check_out(out)  # nothing the user put there or changed since the start is replaced
                _swap(staging, out)
        except KeyboardInterrupt as interrupt:  # noted during the swap, acted on after it: the new report is in place
            interrupt.written = out  # type: ignore[attr-defined]
            raise
    except BaseException:
        with _signals_held():
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
        raise


def _swap(staging: Path, out: Path) -> None:
    """Put ``staging`` in the place of ``out`` (an old report is renamed aside, then deleted)."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # a name reserved beside it
    try:
        out.rename(old)  # a folder renamed onto an empty folder replaces it
    except OSError as error:
        old.rmdir()
        raise InputError(f"--out: cannot replace {out}: {error.strerror or error}") from None
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)  # put the old report back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break
