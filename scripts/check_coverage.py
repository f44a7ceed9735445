#!/usr/bin/env python3
"""check_coverage.py - list every documented flag and signal verb that no real-process test uses.

    .venv/bin/python scripts/check_coverage.py      (run by `make test`)

Reads the flags of the README's settings table and the verbs of its signal table, and looks for
each in the real-process tests (tests/integration/*.py): a flag as the string "--flag", a verb
as ``"signal", "verb"`` (an argv of run_cli). Exits 1 and names what is missing, so a setting
documented without a test fails the build; the fix is a test, or the claim out of the README.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Documented outside the settings table: `forkserve signal --pid`, `exec`'s own options.
EXTRA_FLAGS = ["--pid", "--env", "--pass-env"]


def table(readme: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return readme[readme.index(start):readme.index(end)]


def documented(readme: str) -> tuple[list[str], list[str]]:
    flags = re.findall(r"^\| `\w+` \| `(--[a-z0-9-]+)", table(readme, "settings-table"), re.M)
    verbs = re.findall(r"^\| `SIG\w+` \| `(\w+)` \|", table(readme, "signal-table"), re.M)
    return flags, verbs


def untested(flags: list[str], verbs: list[str], tests: str) -> list[str]:
    missing = [f"flag {flag}" for flag in flags if f'"{flag}"' not in tests]
    missing += [f"signal verb {verb}" for verb in verbs
                if not re.search(rf'"signal",\s*"{verb}"', tests)]
    return missing


def main() -> int:
    readme = (ROOT / "README.md").read_text()
    tests = "\n".join(p.read_text() for p in sorted((ROOT / "tests/integration").glob("*.py")))
    flags, verbs = documented(readme)
    flags += EXTRA_FLAGS
    if len(flags) < 40 or len(verbs) < 7:
        print(f"check_coverage: could not read the README's tables ({flags}, {verbs})",
              file=sys.stderr)
        return 1
    missing = untested(flags, verbs, tests)
    for item in missing:
        print(f"check_coverage: no real-process test uses the {item}", file=sys.stderr)
    print(f"check_coverage: {len(flags)} flags, {len(verbs)} signal verbs; "
          f"{len(missing)} without a test")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
