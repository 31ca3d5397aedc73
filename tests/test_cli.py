"""Job command lines fail fast with messages that name the culprit."""
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, code, needle", [
    (("jobs.pretrain", "--config", "tiny", "--set", "train.stepz=3"), 2, "train.stepz"),
    (("jobs.pretrain", "--config", "tiny", "--set", "masking.ratio=1.5"), 2, "masking.ratio"),
    (("jobs.pretrain", "--config", "nosuch"), 2, "nosuch"),
    (("jobs.pretrain", "--config", "tiny"), 2, "data.source is empty"),
    (("jobs.sweep", "--config", "tuning/mask_ratio_geometry.yaml"), 2, "probe.task"),
    (("jobs.evaluate", "--model-uri", "random", "--task", "/nonexistent/task"), 1, "--config"),
])
def test_bad_input_is_named(args, code, needle):
    r = run(*args)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr, r.stderr


def test_register_help_names_the_real_default_alias():
    r = run("jobs.register", "--help")
    assert r.returncode == 0 and "'current'" in r.stdout and "latest" not in r.stdout


def test_a_local_ray_that_times_out_at_start_up_is_started_again(monkeypatch):
    """Ray's raylet exits when its dashboard agent takes over 15 s (a loaded machine): the half-started node
    is stopped and the node started again; any other error is raised at once."""
    import ray
    from ray._private.node import Node

    from jobs import common
    calls, killed = [], []

    class HalfStarted(Node):
        def __init__(self):  # what ray.init's Node raises when its raylet died during start-up
            raise Exception("The current node timed out during startup. This could happen because ...")

        def kill_all_processes(self, check_alive=True, **kwargs):
            killed.append(check_alive)

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            HalfStarted()

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # never the test process's own Ray
    common._start_private_ray(num_cpus=2)
    assert calls == [{"num_cpus": 2}] * 3 and killed == [False, False]

    calls.clear()
    with pytest.raises(Exception, match="timed out during startup"):
        common._start_private_ray(attempts=2, num_cpus=2)  # every try times out: the last error is raised
    assert len(calls) == 2

    def bad(**kwargs):
        calls.append(kwargs)
        raise ValueError("num_cpus must be positive")
    monkeypatch.setattr(ray, "init", bad)
    calls.clear()
    with pytest.raises(ValueError):
        common._start_private_ray(num_cpus=-1)
    assert len(calls) == 1
