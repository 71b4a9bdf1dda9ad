"""Safe output directories: every writer of a model directory (`save_compressed`, `save_dense`, the LoRA export and its
`--base-out`, the CLI's `compress --out` and `to-dense --out`) goes through `reserve_output` / `output_directory`.

Ownership. An existing output path is replaced only when it is a previous lowrank-ops output (`is_lowrank_output`: it
    holds the manifest lowrank_ops.json, the marker lowrank_ops_base.json of a dense model written by `save_dense`
    (`to-dense`, `export-lora --base-out`), or an adapter_config.json next to an adapter_model.safetensors whose
    metadata names lowrank_ops) or an empty directory.
    Any other directory needs overwrite=True (the CLI's --overwrite). Refused whatever overwrite says: "", ".", the
    working directory or one of its parents, the filesystem root, a path that exists and is not a directory, a
    symbolic link, and a path that is or contains a protected path (the source model).
One writer. `reserve_output` takes an advisory lock (fcntl.flock, exclusive, non-blocking) on `.<name>.lowrank-lock`
    next to the output and holds it until the job ends; a second writer of the same output fails at once with one
    line naming the holder's pid (written into the lock file). The holder unlinks the lock file before unlocking it; a
    writer that locked a file meanwhile unlinked (the path is gone or names another inode) drops it and tries again,
    so two writers never hold locks on different inodes of one path. Within one process a reservation is re-entrant:
    `save_compressed` called by a pipeline that reserved the same output at its start reuses that reservation.
Temporary directories. `.<name>.lowrank-tmp.<pid>.<hex>` next to the output (same filesystem, so the final rename is
    atomic), made by os.mkdir, so their permissions follow the umask (mkdtemp's 0700 does not). Under the lock, a run
    removes those of processes that are no longer alive before it writes anything.
Commit. Every file and directory of the temporary directory is fsynced, then it takes the output's place in one step:
    renameat2(RENAME_EXCHANGE) swaps it with an existing output (the old one, now under the temporary name, is then
    removed) and renameat2(RENAME_NOREPLACE) moves it onto a missing one; the parent directory is fsynced after.
    Fallback, where renameat2 does not exist (not Linux, glibc < 2.28) or the filesystem refuses the flag (EINVAL,
    ENOSYS, EOPNOTSUPP): output -> `.<name>.lowrank-old.<pid>.<hex>`, temporary -> output, then the old one is
    removed, with SIGINT / SIGTERM blocked between the two renames. A SIGKILL between them leaves no output but a
    complete old one: the next run that reserves the output renames it back before anything else.
Interruption. Any exception inside `output_directory` (KeyboardInterrupt included) removes the temporary directory;
    signals are blocked while it is created, so an interrupt cannot land between its creation and the clean-up's
    reach. The CLI turns SIGTERM into the same path.
Portability. Written for Linux. Elsewhere on POSIX the commit takes the fallback; without fcntl (Windows) there is no
    lock and without pthread_sigmask signals are not blocked; a filesystem that refuses to fsync a directory (EINVAL,
    ENOTSUP) is accepted as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import signal
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory lock (module docstring, "Portability")
    fcntl = None

MANIFEST_FILE = "lowrank_ops.json"  # = lowrank_ops.serialization.MANIFEST (a level above; tests check they agree)
BASE_MARKER = "lowrank_ops_base.json"  # written into a dense model (`to-dense`, the base of `export-lora --base-out`)
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TMP_TAG, OLD_TAG, LOCK_TAG = "lowrank-tmp", "lowrank-old", "lowrank-lock"

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100
_FALLBACK_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_SIGNALS = {signal.SIGINT, signal.SIGTERM}
use_renameat2 = True
"""False forces the two-rename fallback (tests of the fallback path; a filesystem known to misbehave)."""


class OutputLocked(ValueError):
    """Another process holds the output's lock."""


def _safetensors_metadata(path: Path) -> dict:
    """The __metadata__ of a safetensors file's header ({} when unreadable): 8-byte little-endian length, JSON."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return {}
            header = json.loads(f.read(length))
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        return metadata if isinstance(metadata, dict) else {}
    except (OSError, ValueError, struct.error):
        return {}


def is_lowrank_output(path: str | os.PathLike) -> bool:
    """True when `path` is a directory a lowrank-ops writer produced (module docstring, "Ownership")."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if any((path / marker).is_file() for marker in (MANIFEST_FILE, BASE_MARKER)):
        return True
    return ((path / ADAPTER_CONFIG_FILE).is_file()
            and "lowrank_ops" in _safetensors_metadata(path / ADAPTER_WEIGHTS_FILE))  # fmt: skip


def _is_empty_dir(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def check_output(target, *, overwrite: bool = False, protect: Iterable = (), where: str = "save_compressed") -> Path:
    """The absolute output path if a writer may (re)place `target`, else ValueError with the rule (module docstring).
    Cheap (no lock, nothing written): the CLI calls it before any work."""
    if target is None or str(os.fspath(target)).strip() == "":
        raise ValueError(f"{where}: the output directory is empty ({str(target)!r}); give a directory path")
    path = Path(os.path.abspath(os.fspath(target)))  # '.' and '..' folded lexically, symlinks kept
    cwd = Path.cwd()
    if path == path.parent or path == cwd or path in cwd.parents:
        raise ValueError(f"{where}: the output {str(target)!r} is the working directory, one of its parents or the "
                         "root; it would be replaced whole: give a directory of its own")  # fmt: skip
    if path.is_symlink():
        raise ValueError(f"{where}: the output {target} is a symbolic link; give the directory itself")
    real = path.resolve()
    for source in protect:
        if source is None or not Path(source).exists():
            continue
        source_real = Path(source).resolve()
        if source_real == real or real in source_real.parents:
            raise ValueError(f"{where}: the output {target} is or contains the source model {source}; replacing it "
                             "would destroy the source: write elsewhere")  # fmt: skip
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{where}: the output {target} exists and is not a directory; give a directory path")
        if not overwrite and not is_lowrank_output(path) and not _is_empty_dir(path):
            raise ValueError(f"{where}: the output {target} exists and is not a lowrank-ops output (no "
                             f"{MANIFEST_FILE}); it would be replaced whole: choose another directory, or give "
                             "--overwrite (overwrite=True) to replace it")  # fmt: skip
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{where}: cannot create the output {target}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: cannot create the output {target}: {ancestor} is not writable")
    return path


def _side_path(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}"


def _side_paths(target: Path, tag: str) -> list[tuple[Path, int]]:
    """(path, writer pid) of the temporary / old directories of `target` left by any writer."""
    pattern = re.compile(re.escape(f".{target.name}.{tag}.") + r"(\d+)\.[0-9a-f]+")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    return [(p, int(m.group(1))) for p in entries if (m := pattern.fullmatch(p.name))]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_and_clean(target: Path) -> None:
    """Under the lock: restore an old output a killed fallback commit left without a successor, then remove the
    temporary / old directories of dead writers."""
    if not os.path.lexists(target):
        olds = [p for p, pid in _side_paths(target, OLD_TAG) if not _pid_alive(pid)]
        if olds:
            os.rename(max(olds, key=lambda p: p.stat().st_mtime), target)
    for tag in (TMP_TAG, OLD_TAG):
        for p, pid in _side_paths(target, tag):
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def _block_signals():
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if hasattr(signal, "pthread_sigmask") else None


def _restore_signals(mask) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when unavailable here (fall back); OSError otherwise."""
    fn = _libc_renameat2() if use_renameat2 else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _FALLBACK_ERRNOS:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _fsync_path(path, flags=os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _fsync_directory(path) -> None:
    try:
        _fsync_path(path, os.O_RDONLY | _DIRECTORY)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR):
            raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_directory(dirpath)


def _commit(tmp: Path, target: Path) -> None:
    """Put the complete, fsynced `tmp` in `target`'s place in one step (module docstring, "Commit")."""
    old = None
    mask = _block_signals()
    try:
        if os.path.lexists(target):
            if _renameat2(tmp, target, _RENAME_EXCHANGE):
                old = tmp  # the previous output, now under the temporary name
            else:
                old = _side_path(target, OLD_TAG)
                os.rename(target, old)
                os.rename(tmp, target)
        elif not _renameat2(tmp, target, _RENAME_NOREPLACE):
            os.rename(tmp, target)
        _fsync_directory(target.parent)
    finally:
        _restore_signals(mask)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class OutputReservation:
    """The lock on one output path, held by this process (`reserve_output`); `writing()` makes its content."""

    def __init__(self, path: Path, overwrite: bool, protect: tuple, where: str):
        self.path, self.overwrite, self.protect, self.where = path, overwrite, protect, where
        self.lock_path = path.parent / f".{path.name}.{LOCK_TAG}"
        self._fd: int | None = None

    def _acquire(self) -> None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                raise ValueError(f"{self.where}: cannot write next to the output {self.path}: {exc.strerror} "
                                 f"({exc.filename})") from None  # fmt: skip
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputLocked(f"{self.where}: the output {self.path} is being written by another process (pid "
                                   f"{holder}, lock {self.lock_path}); wait for it to end or choose another "
                                   "output") from None  # fmt: skip
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its previous holder had just unlinked: take the new one
        if fcntl is not None:  # the holder's pid, for the message a second writer gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        try:
            _recover_and_clean(self.path)
            check_output(self.path, overwrite=self.overwrite, protect=self.protect, where=self.where)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)  # still locked: nobody can hold this inode now
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A fresh temporary directory next to the output; on a normal exit it is fsynced and takes the output's
        place (`_commit`), on an exception it is removed."""
        mask = _block_signals()  # no interrupt between mkdir and the try that removes it
        try:
            tmp = _side_path(self.path, TMP_TAG)
            os.mkdir(tmp)  # 0o777 & ~umask
            try:
                _restore_signals(mask)
                mask = None
                yield tmp
                # the output may have changed during a long job (a user's files put there): check once more
                check_output(self.path, overwrite=self.overwrite, protect=self.protect, where=self.where)
                _fsync_tree(tmp)
                _commit(tmp, self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            if mask is not None:
                _restore_signals(mask)


_HELD: dict[Path, OutputReservation] = {}


@contextlib.contextmanager
def reserve_output(target, *, overwrite: bool = False, protect: Iterable = (),
                   where: str = "save_compressed") -> Iterator[OutputReservation]:  # fmt: skip
    """Check `target` (`check_output`), lock it for this process (a second writer fails at once), restore / clean
    what dead writers left, and hold the lock until the block ends. Re-entrant within one process."""
    protect = tuple(protect)
    path = check_output(target, overwrite=overwrite, protect=protect, where=where)
    key = path.resolve()
    held = _HELD.get(key)
    if held is not None:
        yield held
        return
    reservation = OutputReservation(path, overwrite, protect, where)
    reservation._acquire()
    _HELD[key] = reservation
    try:
        yield reservation
    finally:
        del _HELD[key]
        reservation._release()


@contextlib.contextmanager
def output_directory(target, *, overwrite: bool = False, protect: Iterable = (),
                     where: str = "save_compressed") -> Iterator[Path]:  # fmt: skip
    """`reserve_output` + `writing`: yields a temporary directory that replaces `target` when the block succeeds."""
    with reserve_output(target, overwrite=overwrite, protect=protect, where=where) as reservation:
        with reservation.writing() as tmp:
            yield tmp
