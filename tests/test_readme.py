"""The README stays true: every config key is documented, and .ci/run calls the README's test command."""
from pathlib import Path

from service.config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_in_the_reference():
    text = (ROOT / "README.md").read_text()
    missing = []
    for key in Config().flat():
        section, _, name = key.rpartition(".")
        if f"`{key}`" in text:
            continue
        if section and f"`{section}." in text and (f"/ `{name}`" in text or f"`{name}` /" in text):
            continue
        missing.append(key)
    assert not missing, f"config keys missing from README's reference: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("## What it does")[0]
    assert "make test" in ci
