"""DALI reader processes die with the trainer under SIGKILL/SIGTERM and hold none of its files."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from fgclip_mega.config import DataConfig
    from fgclip_mega.data.loader import build_loader

    syn_dir, log_path, start_method = sys.argv[1:4]
    log = open(log_path, "a")  # a log file the trainer holds open (like a logging FileHandler)
    log.write("started\\n")
    log.flush()
    cfg = DataConfig(shards="", synthetic_dir=syn_dir, synthetic_num_samples=16,
                     micro_batch_size=4, py_num_workers=1, py_start_method=start_method)
    loader = build_loader(cfg, 32, kind="dali")
    next(loader)
    me = os.getpid()
    kids = []
    for tid in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{tid}/children") as fh:
            kids += [int(p) for p in fh.read().split()]
    print(json.dumps(kids), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("start_method, sig", [("fork", signal.SIGKILL), ("spawn", signal.SIGTERM)])
def test_reader_workers_die_with_the_trainer(tmp_path, start_method, sig):
    log = tmp_path / "train.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "syn"), str(log), start_method],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the trainer script failed (exit {proc.wait()})"
        workers = [p for p in json.loads(line) if _alive(p)]
        assert workers, "no reader process was started"
        for pid in workers:  # the worker holds none of the trainer's writable files
            assert str(log) not in _open_files(pid), pid
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        for pid in survivors:  # do not leave them behind even when the test fails
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"reader processes {survivors} outlived the trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
