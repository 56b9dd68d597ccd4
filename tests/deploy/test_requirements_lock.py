"""``requirements.lock`` pins everything the Makefile installs, and the venv holds exactly that.

The Makefile installs ``requirements*.txt`` under the lock's constraints (``-c requirements.lock``),
so a fresh machine gets the versions the code was tested with, not whatever the registry serves
that day. ``make lock`` rewrites the lock from a fresh venv.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
# The installer's own tools and the project itself (installed editable from the tree).
NOT_LOCKED = {"pip", "setuptools", "wheel", "gid-service"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonical(_NAME.match(line).group(1)))
    return names


def test_every_direct_requirement_is_pinned_in_the_lock():
    pins = lock_pins()
    for req in ("requirements.txt", "requirements-dev.txt"):
        missing = requirement_names(ROOT / req) - pins.keys()
        assert not missing, f"{req}: not in requirements.lock: {sorted(missing)} (run make lock)"


def test_the_venv_holds_exactly_the_locked_versions():
    pins = lock_pins()
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    unlocked = sorted(set(installed) - pins.keys() - NOT_LOCKED)
    assert not unlocked, f"installed but not locked: {unlocked} (add them to requirements*.txt, run make lock)"
    differing = {n: (installed[n], v) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not differing, f"installed != locked (installed, locked): {differing}"
    absent = sorted(n for n in pins if n not in installed)
    assert not absent, f"locked but not installed: {absent}"


def test_makefile_installs_under_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c requirements.lock" in makefile
    assert re.search(r"^\$\(STAMP\):.*requirements\.lock", makefile, re.M), "the venv must rebuild when the lock changes"
