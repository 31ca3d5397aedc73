"""The README stays true: its configuration reference documents exactly the config's keys, and .ci/run calls
the README's test command."""
import re
from pathlib import Path

from service.config import Config

ROOT = Path(__file__).resolve().parents[1]
# where the configuration reference lives: (file, heading of its section)
REFERENCE = (ROOT / "README.md", "## Configuration reference")


def reference_keys(text: str, heading: str = REFERENCE[1]) -> set[str]:
    """Dotted keys named in the first column of the reference's table rows.

    A cell may name several keys of one section: "`model.width` / `depth` / `heads`" (or with commas);
    a bare name belongs to the section of the dotted key before it in the same cell."""
    assert heading in text, f"{heading!r} not found"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        prefix = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "." in name:
                prefix = name.rpartition(".")[0] + "."
                keys.add(name)
            else:
                keys.add(prefix + name)
    return keys


def test_every_config_key_is_in_the_reference():
    documented = reference_keys(REFERENCE[0].read_text())
    missing = sorted(set(Config().flat()) - documented)
    assert not missing, f"config keys missing from the configuration reference ({REFERENCE[0].name}): {missing}"


def test_the_reference_names_no_key_the_config_lacks():
    documented = reference_keys(REFERENCE[0].read_text())
    stale = sorted(documented - set(Config().flat()))
    assert not stale, f"the configuration reference ({REFERENCE[0].name}) names keys the config lacks: {stale}"


def test_the_reference_check_can_fail():
    text = "## Configuration reference\n\n| key | default |\n| --- | --- |\n| `model.width` / `depth` | 1 / 2 |\n"
    assert reference_keys(text) == {"model.width", "model.depth"}
    assert "model.heads" not in reference_keys(text)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("## What it does")[0]
    assert "make test" in ci
