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
