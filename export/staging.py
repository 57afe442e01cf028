"""An export's output directory: built hidden, shown only when complete.

The artifact is written into ``.NAME.partial-PID`` beside the requested path; when it is
complete it takes the requested name (an older artifact there is replaced in two
renames). A crash leaves at most a ``.NAME.partial-*`` directory, never something that
looks complete, and the next export removes those of processes that are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from swapmoe_edge.artifact.manifest import MANIFEST_NAME
from swapmoe_edge.core.errors import CheckpointError, ExportError

from . import space


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` beside ``out`` left by exports that died
    (SIGKILL, power loss); those of live processes stay. Returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        for tag in (".partial-", ".old-"):
            prefix = f".{out.name}{tag}"
            if p.name.startswith(prefix) and p.name[len(prefix):].isdigit():
                pid = int(p.name[len(prefix):])
                if pid != os.getpid() and not _pid_alive(pid) and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


class TerminatedBySignal(SystemExit):
    """SIGTERM or SIGHUP during export: unwinds like Ctrl-C so the partial directory is removed."""


_UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # kill's default, and a closed terminal or SSH session


@contextlib.contextmanager
def sigterm_unwinds():
    """Turn SIGTERM and SIGHUP into an exception while exporting, where they would otherwise
    kill the process outright (default action; an ignored signal or the caller's own handler
    stays). Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TerminatedBySignal(128 + signum)

    previous = {s: signal.getsignal(s) for s in _UNWIND_SIGNALS}
    for s, prev in previous.items():
        if prev == signal.SIG_DFL:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, prev in previous.items():
            if prev == signal.SIG_DFL:
                signal.signal(s, prev)


def prepare_output(out: Path, force: bool = False, say=None) -> Path:
    """A fresh hidden directory beside ``out`` to build into; ``out`` must be new, empty or an artifact.

    An old artifact is replaced only when it holds nothing but the files its manifest lists:
    anything else (a profile, notes) is the user's, and would go with it. ``force`` replaces it
    anyway, and ``say`` is told what is removed.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} is an existing file; pass a directory path (new, or an old artifact).")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"output directory {out} is not empty and holds no swapmoe artifact; refusing to replace it. "
            "Choose a new or empty directory."
        )
    if out.is_dir() and (out / MANIFEST_NAME).is_file():
        extra = unlisted_files(out)
        if extra and not force:
            raise ExportError(
                f"output directory {out} holds an artifact and {len(extra)} file(s) its manifest does not list, which "
                f"re-exporting would delete: {_names(extra)}. Move them out first, export elsewhere, or pass --force "
                "(force=True) to replace the directory with them."
            )
        if extra and say:
            say(f"--force: replacing {out} removes {len(extra)} file(s) its manifest does not list: {_names(extra)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def unlisted_files(art: Path) -> list[str]:
    """Paths under an artifact directory (relative, sorted) that its manifest neither lists nor is.

    A manifest that cannot be read lists nothing. Empty directories are left out (nothing is
    lost with them); a symlink counts as a file and is not followed.
    """
    try:
        listed = set(json.loads((art / MANIFEST_NAME).read_text(encoding="utf-8")).get("files") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        listed = set()
    listed.add(MANIFEST_NAME)
    found = []
    for dirpath, dirnames, filenames in os.walk(art):  # does not follow symlinked folders
        base = Path(dirpath).relative_to(art)
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in filenames + links:
            rel = (base / name).as_posix()
            if rel not in listed:
                found.append(rel)
    return sorted(found)


def _names(rels: list[str], shown: int = 10) -> str:
    more = f" and {len(rels) - shown} more" if len(rels) > shown else ""
    return ", ".join(rels[:shown]) + more


def install(tmp: Path, out: Path) -> None:
    """Move the finished artifact into place; an older artifact there is replaced.

    SIGTERM, SIGINT and SIGHUP wait until both renames are done, so a kill never leaves the old
    artifact moved aside and the new one not yet in place."""
    blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        _rename_into_place(tmp, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _rename_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def removed_on_failure(tmp: Path, out: Path, need_free: tuple[int, int], on_signal=None):
    """Run an export's writing into the staging folder ``tmp``; on any failure remove ``tmp`` and
    re-raise: a signal as it is (after ``on_signal()``), an OSError as one line that names the
    file (a checkpoint file that cannot be read, or the artifact's write that failed with the
    space it needed, space.write_error)."""
    try:
        yield
    except TerminatedBySignal:
        shutil.rmtree(tmp, ignore_errors=True)
        if on_signal is not None:
            on_signal()
        raise
    except OSError as e:  # a full disk, a read-only or vanished folder: one line that names the file
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename and tmp not in Path(e.filename).parents:
            raise CheckpointError(f"cannot read {e.filename}: {e.strerror or e}. Check the checkpoint's files.") from e
        raise space.write_error(e, out, *need_free) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
