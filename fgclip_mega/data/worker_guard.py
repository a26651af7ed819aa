"""Reader worker processes die with the trainer, whatever kills it.

DALI's parallel external source runs our SampleSource in worker processes (~0.5 GB each) that
outlive a parent killed by SIGKILL or SIGTERM (what Slurm, Kubernetes and torchrun send): they
wait forever for work and keep the parent's files open (a log file, the write end of a `tee`
pipe). `guard_worker` runs in each worker when it first gets control and arranges, in order:

  1. prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills the worker as soon as its parent dies.
     Linux ties this to the parent *thread* that started the worker, so it is used only when
     the pool was started from the main thread (a helper thread's exit would kill the worker);
  2. a watchdog thread that polls the parent pid every WATCH_INTERVAL s and kills the worker
     when it changed (other platforms, other threads, and a parent that died before step 1);
  3. files inherited through fork and open for writing (other than stdin/out/err, /dev and
     shared-memory files) are pointed at /dev/null, so a worker never holds the trainer's files.
     They are replaced, not closed: Python objects in the forked copy still own those numbers.

Torch-free, stdlib only: it runs inside DALI's reader processes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL = 0.5
_guarded_pid: int | None = None


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL)
        if os.getppid() != parent_pid:  # reparented: the parent is gone
            os.kill(os.getpid(), signal.SIGKILL)


def _writable_inherited_files() -> list[int]:
    """Fds > 2 of regular files open for writing, outside /dev (shared memory) and memfds."""
    out = []
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return out
    for fd in fds:
        if fd <= 2:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            target = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as fh:  # "pos: N\nflags: 0100001\n..."
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            flags = int(fields["flags"].strip(), 8)
        except (OSError, ValueError, KeyError):
            continue
        if not target.startswith("/") or target.startswith("/dev/") or "(deleted)" in target:
            continue
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            out.append(fd)
    return out


def release_inherited_files() -> list[int]:
    """Points inherited writable file fds at /dev/null; returns the fds replaced."""
    fds = _writable_inherited_files()
    if fds:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in fds:
                os.dup2(null, fd)
        finally:
            os.close(null)
    return fds


def guard_worker(parent_pid: int, use_pdeathsig: bool = True, forked: bool = True) -> None:
    """Makes this worker process die with `parent_pid`; once per process, no-op in the parent."""
    global _guarded_pid
    pid = os.getpid()
    if pid == parent_pid or _guarded_pid == pid:
        return
    _guarded_pid = pid
    if use_pdeathsig:
        _set_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before the guard was in place
        os.kill(pid, signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="parent-watch").start()
    if forked:
        release_inherited_files()
