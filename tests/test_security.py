"""Hardening without the full local cluster: a job's private Ray (loopback only, token auth, gone after SIGTERM or
Ctrl-C), and `cluster/local` signalling only processes it started (reused PIDs left alone, a failed `up` cleaned
up, the token private from its first byte).

Only processes these tests start are ever inspected or signalled, by PID."""
import ipaddress
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import cluster.local as local
from cluster.procs import descendants, start_group

ROOT = Path(__file__).resolve().parents[1]
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def identity(pid: int) -> dict | None:
    """The record format of cluster/local's pids.json: PID + start time (stat field 22) + boot id."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if f[0] == "Z" else {"pid": pid, "start": int(f[19]), "boot": BOOT_ID}


def same_process(ident: dict) -> bool:
    return identity(ident["pid"]) == ident


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every TCP socket in LISTEN state (from /proc/net/tcp and tcp6)."""
    out = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":
                continue
            addr, port = f[1].split(":")
            words = [struct.pack("<I", int(addr[i:i + 8], 16)) for i in range(0, len(addr), 8)]
            out[int(f[9])] = (socket.inet_ntop(family, b"".join(words)), int(port, 16))
    return out


def listeners_of(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of the listening TCP sockets the given processes hold."""
    table, out = listening_sockets(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in table:
                out.append((pid, *table[int(link[8:-1])]))
    return sorted(set(out))


def loopback(address: str) -> bool:
    """127.0.0.1, also in its IPv4-mapped IPv6 form (::ffff:127.0.0.1) on a dual-stack socket."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip == ipaddress.ip_address("127.0.0.1")


def http_status(url: str, headers: dict | None = None, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}, method=method), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def kill_recorded(idents) -> None:
    """Clean up after a failed assertion: SIGKILL only processes still the ones recorded."""
    for ident in idents:
        if same_process(ident):
            try:
                os.kill(ident["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


JOB = """
import json, os, sys, time
from jobs.common import init_ray
init_ray()
import ray
print(json.dumps({"dashboard": ray._private.worker.global_worker.node.address_info["webui_url"],
                  "token": os.environ.get("RAY_AUTH_TOKEN_PATH")}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_direct_job_private_ray_is_loopback_with_token_and_gone_after_signal(sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    job = subprocess.Popen([sys.executable, "-c", JOB], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    tree = []
    try:
        info = json.loads(job.stdout.readline())
        time.sleep(3)  # the dashboard agent and idle workers come up after ray.init returns
        tree = [i for p in [job.pid, *descendants([job.pid])] if (i := identity(p))]
        assert len(tree) > 3, "the job started no Ray processes"
        socks = listeners_of(i["pid"] for i in tree)
        assert socks and all(loopback(addr) for _, addr, _ in socks), f"listening beyond 127.0.0.1: {socks}"
        assert info["token"], "the private Ray has no token of its own"
        token = Path(info["token"])
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.parent != Path.home() / ".ray"
        api = f"http://{info['dashboard'].removeprefix('http://')}/api/jobs/"
        assert http_status(api) in (401, 403), "the private Ray's job API answered without a token"
        assert http_status(api, {"Authorization": f"Bearer {token.read_text().strip()}"}) == 200
        job.send_signal(sig)
        assert job.wait(timeout=120) == 128 + sig
        deadline = time.time() + 30
        while time.time() < deadline and any(same_process(i) for i in tree):
            time.sleep(0.5)
        survivors = [i["pid"] for i in tree if same_process(i)]
        assert not survivors, f"Ray processes of the stopped job survived: {survivors}"
        assert not token.parent.exists(), "the job's token directory was left behind"
    finally:
        kill_recorded(tree)
        job.kill()
        job.wait()


def _record(state: Path, services: dict) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "pids.json").write_text(json.dumps({"services": services, "members": []}))


def test_down_leaves_reused_pids_alone(tmp_path, capsys):
    """A recorded PID whose start time or boot id differs is someone else's process now: never signalled."""
    other = start_group(["sleep", "300"], tmp_path / "sleep.log")
    try:
        me = identity(other.pid)
        _record(tmp_path / "a", {"s3": {**me, "start": me["start"] + 1}})      # PID reused by another program
        _record(tmp_path / "b", {"mlflow": {**me, "boot": "another-boot"}})   # PID reused after a reboot
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "pids.json").write_text(json.dumps({"ray": other.pid}))  # older format: a bare PID
        for name in ("a", "b", "c"):
            local.down(tmp_path / name)
            time.sleep(0.5)
            assert other.poll() is None, f"`down` ({name}) signalled a process it did not start"
            assert not (tmp_path / name / "pids.json").exists()
        out = capsys.readouterr().out
        assert out.count("left alone") == 3, out
    finally:
        other.kill()
        other.wait()


def test_down_stops_the_recorded_process_group_and_descendants(tmp_path):
    proc = start_group(["sh", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "sh.log")
    time.sleep(0.5)
    tree = [i for p in [proc.pid, *descendants([proc.pid])] if (i := identity(p))]
    assert len(tree) == 3
    _record(tmp_path / "state", {"s3": identity(proc.pid)})
    try:
        local.down(tmp_path / "state")
        proc.wait(timeout=30)
        assert not [i["pid"] for i in tree if same_process(i)]
    finally:
        kill_recorded(tree)


def test_failed_up_stops_what_it_started_and_token_is_private_from_creation(tmp_path, monkeypatch):
    """MLflow never answers and the Ray binary is missing: `up` must raise having stopped moto and MLflow.

    With umask 0 a file written first and chmod-ed after would be world-readable for a moment: the token must
    be created 0600 (no chmod needed, so chmod is forbidden here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text("#!/bin/sh\nexec sleep 300\n")  # an MLflow that never comes up
    (fake / "mlflow").chmod(0o755)
    monkeypatch.setattr(local, "bin_path", lambda name: str(fake / name))  # and no `ray` there at all
    started = []

    def recording_start_group(*a, **kw):
        proc = start_group(*a, **kw)
        started.append((proc, identity(proc.pid)))
        return proc
    monkeypatch.setattr(local, "start_group", recording_start_group)
    state = tmp_path / "cluster"

    def no_chmod(path, mode, *a, **kw):
        raise AssertionError(f"chmod({path}, {oct(mode)}) after creation: the file was readable before it")
    old_umask = os.umask(0)
    try:
        monkeypatch.setattr(os, "chmod", no_chmod)
        with pytest.raises(FileNotFoundError):
            local.up(state, num_cpus=1)
        monkeypatch.undo()
        assert len(started) == 2, "moto and MLflow should have been started before Ray"
        for proc, ident in started:
            proc.wait(timeout=30)
            assert not same_process(ident)
        assert not (state / "pids.json").exists() and not (state / "env").exists()
        assert stat.S_IMODE((state / "ray_token").stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
        for proc, ident in started:
            kill_recorded([ident])
            proc.wait()


def test_old_world_readable_token_is_replaced(tmp_path):
    token = tmp_path / "ray_token"
    token.write_text("old")
    token.chmod(0o644)
    value, fresh = local._secret(token)
    assert fresh and value != "old" and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert local._secret(token) == (value, False)  # kept across restarts once private
