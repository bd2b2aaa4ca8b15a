"""The suite runs on the versions constraints.txt pins, and the Makefile installs with them."""

import os
import re
import subprocess
from importlib import metadata

from moe_jax.run_identity import LIBRARIES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _constraints() -> dict[str, str]:
    pins = {}
    with open(os.path.join(REPO_ROOT, "constraints.txt"), encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;+]+)", line)
            assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def _is_installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_installed_versions_are_the_pinned_ones():
    pins = _constraints()
    # every library a run records in run_history.jsonl is pinned where the suite installs it
    installed = {name for name in LIBRARIES if _is_installed(name)}
    assert installed <= set(pins), sorted(installed - set(pins))
    assert {"jax", "jaxlib", "flax", "optax", "transformers", "torch"} <= installed
    differing = {}
    for name, pinned in pins.items():
        try:
            installed = metadata.version(name).split("+")[0]  # 2.13.0+cpu is torch 2.13.0
        except metadata.PackageNotFoundError:
            continue  # pinned for a package another extra installs
        if installed != pinned:
            differing[name] = (pinned, installed)
    assert not differing, (
        f"installed versions differ from constraints.txt (pinned, installed): {differing}; "
        "after `make test` passes on new versions, `make constraints` records them"
    )


def test_make_installs_with_the_constraints():
    commands = subprocess.run(
        ["make", "-n", "-B", "VENV=/nonexistent-venv", "venv"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    install = [line for line in commands.splitlines() if "pip install" in line and "-e" in line]
    assert install and "-c constraints.txt" in install[0], commands
