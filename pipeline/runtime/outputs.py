"""The one check of an output location, for every command that writes (pipeline.build, pipeline.local_build,
pipeline.audit, model.train; model.evaluate and model.ship can call it the same way).

A local output folder must be a folder (or not exist yet, below a folder that can be written), must be
empty unless --overwrite (a sub-folder or a hidden file counts: a COCO root is never written into without
it), and must be writable: a file is created there and removed again, so a read-only filesystem or a
folder without write permission is refused before any work, with one line naming the path and the cause.
Nothing that was there is touched by a refusal. Remote paths (gs://...) are the callers' business
(Beam's FileSystems), as before.

Writes that fail later (disk full, a filesystem remounted read-only) are turned into the same error by
`writing`, and `reserve_space` refuses a large write that cannot fit before it starts.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import sys
import tempfile

_PROBE_PREFIX = ".write-probe-"


class OutputError(ValueError):
    """An output location that cannot be used or written; the message names the path and the cause."""


def is_remote(path: str) -> bool:
    return "://" in path


def _reason(error: OSError) -> str:
    """A short cause: 'Read-only file system', 'No space left on device', ... (never a multi-line text)."""
    if error.errno is not None:
        return os.strerror(error.errno)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# The causes of a write that fails for want of room or of a writable filesystem (never of the data written).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def write_failure(error: BaseException) -> str | None:
    """The cause ('No space left on device', 'Read-only file system', ...) when error is a write refused by
    the filesystem, from its errno or (libraries that wrap it: TensorFlow, Beam's workers) its text; else None."""
    code = getattr(error, "errno", None)
    if code in WRITE_ERRNOS:
        return os.strerror(code)
    text = str(error)
    return next((os.strerror(c) for c in WRITE_ERRNOS if os.strerror(c) in text), None)


def dataset_write_failure(output_dir: str, error: BaseException) -> str:
    """The one line of a build that could not write its shards (write_failure(error) is not None)."""
    return (f"cannot write the dataset in {output_dir}: {write_failure(error)}; no index was written, so nothing "
            f"there claims a complete dataset (free some room and build again with --overwrite)")


def nearest_existing(path: str) -> str:
    """path, or the nearest folder above it that exists (what workers must see before it is made)."""
    if is_remote(path):
        return path
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def probe_writable(folder: str, flag: str = "output") -> None:
    """Creates and removes a temporary file in `folder`; OutputError naming the folder and the cause."""
    try:
        fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{flag} {folder} cannot be written: {_reason(e)}") from None


def check_apart(path: str, inputs: dict, flag: str = "output_dir") -> None:
    """Refuses an output location that is one of the command's inputs ({flag name: path}) or lies inside
    one, links resolved: its files (a COCO root, a dataset, a run) would be written over or removed."""
    if is_remote(path):
        return
    out = os.path.realpath(path)
    for name, source in inputs.items():
        if not source or is_remote(source):
            continue
        src = os.path.realpath(source)
        if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
            raise OutputError(f"{flag} {path} is {'' if out == src else 'inside '}the {name} {source} this command "
                              f"reads: choose a folder of its own")


def check_output_dir(path: str, *, overwrite: bool = False, must_be_empty: bool = True,
                     flag: str = "output_dir", inputs: dict | None = None, reuse_if: tuple = ()) -> None:
    """Refuses (OutputError, one line) a local output folder that cannot be used; changes nothing.

    must_be_empty=False for folders that are reused on purpose (model.train's run directory, a report
    folder); reuse_if then names (glob patterns below it, 'sub/x' too) what it holds: a non-empty folder with none of
    them is another's (a COCO folder, a dataset) and is refused. inputs: see check_apart."""
    if not path:
        raise OutputError(f"--{flag} is empty")
    if is_remote(path):
        return
    check_apart(path, inputs or {}, flag)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} exists and is not a folder")
    if not os.path.isdir(path):
        parent = nearest_existing(path)
        if not os.path.isdir(parent):
            raise OutputError(f"{flag} {path} cannot be made: {parent} is not a folder")
        probe_writable(parent, flag)
        return
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise OutputError(f"{flag} {path} cannot be read: {_reason(e)}") from None
    if entries and not must_be_empty and reuse_if and \
            not any(glob.glob(os.path.join(glob.escape(path), pattern)) for pattern in reuse_if):
        raise OutputError(f"{flag} {path} is not empty and holds none of {', '.join(reuse_if)}: it is not this "
                          f"command's folder; choose an empty one")
    if entries and must_be_empty and not overwrite:
        shown = ", ".join(e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in entries[:5])
        raise OutputError(f"{flag} {path} is not empty ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}"
                          f"{', ...' if len(entries) > 5 else ''}); pass --overwrite to replace what this "
                          f"command writes there, or choose an empty folder")
    probe_writable(path, flag)


def prepare_output_dir(path: str, *, overwrite: bool = False, prog: str | None = None, must_be_empty: bool = True,
                       ours: tuple = (), flag: str = "output_dir", inputs: dict | None = None) -> str:
    """check_output_dir, then (local folders) removes the files of ours (glob patterns, in that order) when
    overwrite, and creates the folder. Returns path.

    prog: a command's name: an unusable location then prints `prog: error: ...` (one line) and exits with
    status 2, for a command's main to call as is; without it, OutputError is raised."""
    try:
        check_output_dir(path, overwrite=overwrite, must_be_empty=must_be_empty, flag=flag, inputs=inputs)
        if is_remote(path):
            return path
        if overwrite and os.path.isdir(path):
            names = os.listdir(path)
            for pattern in ours:
                for name in sorted(fnmatch.filter(names, pattern)):
                    with writing(os.path.join(path, name), "remove"):
                        os.remove(os.path.join(path, name))
        with writing(path, "create"):
            os.makedirs(path, exist_ok=True)
    except OutputError as e:
        if prog is None:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return path


def require_space(folder: str, nbytes: int, what: str) -> None:
    """OutputError (one line) when the filesystem of folder reports less than nbytes free for `what`."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise OutputError(f"cannot write {what} in {folder}: {os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB "
                          f"free, up to {nbytes / 2**20:.1f} MiB needed)")


def reserve_space(folder: str, nbytes: int, what: str) -> None:
    """Makes sure nbytes more can be written in folder (free space and quota alike) by allocating them in a
    temporary file there, removed again before returning: a write that follows at once fits. OutputError
    (one line) when they cannot be. For writers that fail badly on a full disk (HDF5 leaves a file it can
    neither write nor close, and crashes the process at exit)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".reserve-", dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write {what} in {folder}: {_reason(e)}") from None
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, max(int(nbytes), 1))
        else:  # no fallocate: the free space the filesystem reports (quotas unseen)
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize < nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
        raise OutputError(f"cannot write {what} in {folder}: {_reason(e)} ({nbytes / 2**20:.1f} MiB needed)") \
            from None
    finally:
        os.close(fd)
        os.unlink(name)


@contextlib.contextmanager
def writing(path: str, what: str = "write"):
    """Turns an OSError raised inside (disk full, read-only filesystem, no permission) into OutputError
    naming the path and the cause (one line)."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot {what} {path}: {_reason(e)}") from None
