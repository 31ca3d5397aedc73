"""Start and stop helper services (moto, MLflow, Ray head) by process group, never by name.

A recorded PID is only trusted while it names the same process: `identity` (start time since boot + boot
id) is stored with it, and `same_process` checks both before anything is signalled, so a PID that a later
boot or another program reused is left alone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

# Ray on Linux rewrites 127.0.0.1 to the machine's own address (in a node's address and in the GCS address a
# driver connects to) unless this (misnamed) flag is "0", and it binds its GCS, raylet, agents and workers to the
# node address: with the flag, a Ray started on this machine (the local cluster's head, a job's private Ray)
# listens on 127.0.0.1 only, and drivers here can reach it.  Ray reads it when it is imported, so it must be in
# the environment before `import ray` (or in the environment of `ray start`).
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port(exclude: set[int] | None = None) -> int:
    """A free TCP port on 127.0.0.1 (never 5000, MLflow's default, which moto also wants)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 5000 and port not in (exclude or set()):
            return port


def start_group(cmd: list[str], log_path: Path | str, env: dict | None = None) -> subprocess.Popen:
    """Run cmd in its own session/process group, output to log_path."""
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})})


def stop_group(proc_or_pgid, timeout: float = 20.0) -> None:
    """SIGTERM the whole group, wait, then SIGKILL what is left (MLflow's workers outlive the parent)."""
    pgid = proc_or_pgid if isinstance(proc_or_pgid, int) else proc_or_pgid.pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and group_alive(pgid):
            if not isinstance(proc_or_pgid, int):
                proc_or_pgid.poll()
            time.sleep(0.2)
        if not group_alive(pgid):
            break
    if not isinstance(proc_or_pgid, int):
        try:
            proc_or_pgid.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def write_private(path: Path | str, text: str) -> None:
    """Create `path` holding `text`, mode 0600 from the first byte (never readable by others, even briefly).

    O_EXCL refuses an existing file or a planted symlink; callers that replace a file remove it first.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def boot_id() -> str:
    """This boot's random id: start times (clock ticks since boot) only compare within one boot."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def identity(pid: int) -> dict | None:
    """What tells this process from a later one with the same PID: start time (stat field 22) + boot id."""
    f = _stat(pid)
    if f is None or f[0] == "Z":
        return None
    return {"pid": pid, "start": int(f[19]), "boot": boot_id()}


def same_process(record) -> bool:
    """The recorded process still runs: same PID, same start time, same boot (not a reused PID).

    A bare PID (no start time recorded) can never be confirmed, so it never counts as ours.
    """
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return False
    now = identity(record["pid"])
    return now is not None and (now["start"], now["boot"]) == (record.get("start"), record.get("boot"))


def process_group(pid: int) -> int | None:
    f = _stat(pid)
    return int(f[2]) if f else None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg; look for a live member
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s ({last})")


def descendants(roots: list[int]) -> list[int]:
    """Every live process below the given pids (some start new sessions, e.g. Ray's)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, stack = [], list(roots)
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (collected first), by pid."""
    victims = {pid, *group_members(pid)}
    victims.update(descendants(list(victims)))
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
