"""Locks around a run: one run per output folder, and no silent wait on a stale build lock.

* :func:`lock_output_dir` takes an exclusive ``fcntl.flock`` on ``OUT/.fastvl-lock`` (released by the
  kernel when the process dies, however it dies) and writes the holder's pid and host into it; a
  second run on the same folder gets :class:`OutputDirBusy` naming that pid. Under a launcher only
  rank 0 takes it: the other ranks of the same run must not lock each other out, and a second run's
  other ranks wait in rendezvous for their rank 0, which has refused (the launcher then ends them).
* :func:`clear_stale_build_locks`: torch's JIT extension builder (DeepSpeed's CPU shared-memory op is
  built and loaded this way at every start) holds a ``lock`` file in the build folder while it runs
  ninja; a process killed in that window leaves the file behind and every later start waits for it
  forever, printing nothing. A holder keeps the file open, so a lock file no live process has open,
  and still there a moment later, is stale: it is removed with a message.
"""

from __future__ import annotations

import fcntl
import glob
import os
import socket
import sys
import time

LOCK_FILE = ".fastvl-lock"


class OutputDirBusy(RuntimeError):
    """Another live run holds the output folder."""


class OutputLock:
    """An exclusive lock on an output folder (see :func:`lock_output_dir`); ``release()`` or process exit frees it."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *_) -> None:
        self.release()


def lock_output_dir(out_dir: str) -> OutputLock:
    """Creates ``out_dir`` if needed and locks it for this process; raises :class:`OutputDirBusy` naming
    the holder's pid when another process has it, ``NotADirectoryError`` when it is a file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir} is an existing file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputDirBusy(f"{out_dir} is in use by a running fastvl run ({holder}); wait for it to end, stop it, "
                            "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return OutputLock(path, fd)


def _open_by_live_process(path: str) -> bool | None:
    """Whether some process has ``path`` open (None if /proc cannot tell)."""
    target = os.path.realpath(path)
    if not os.path.isdir("/proc/self/fd"):
        return None
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            links = os.listdir(fd_dir)
        except OSError:
            continue
        for link in links:
            try:
                if os.readlink(os.path.join(fd_dir, link)) == target:
                    return True
            except OSError:
                continue
    return False


def clear_stale_build_locks(build_root: str | None = None, settle_s: float = 0.5, log=None) -> list[str]:
    """Removes the torch extension build locks under ``build_root`` (default: torch's extension folder,
    ``TORCH_EXTENSIONS_DIR``) that no live process holds; returns their paths. A lock a live process
    holds is reported (a build is running; the wait that follows is not silent)."""
    if log is None:
        def log(message):
            print(message, file=sys.stderr, flush=True)
    if build_root is None:
        from torch.utils.cpp_extension import get_default_build_root

        build_root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    locks = glob.glob(os.path.join(build_root, "*", "lock")) + glob.glob(os.path.join(build_root, "*", "*", "lock"))
    if not locks:
        return []
    holders = {path: _open_by_live_process(path) for path in locks}
    unheld = [path for path, held in holders.items() if held is False]
    for path, held in holders.items():
        if held:
            log(f"fastvl: {path} is held by a running build of a torch extension; waiting for it")
        elif held is None:
            log(f"fastvl: {path} exists; if no torch extension build is running, delete it (the start waits for it)")
    if unheld:
        time.sleep(settle_s)  # a holder closes the file just before removing it
    removed = []
    for path in unheld:
        if os.path.exists(path) and _open_by_live_process(path) is False:
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
            log(f"fastvl: removed the stale lock {path} (left by a process killed while building or loading a "
                "torch extension; no process holds it)")
    return removed
