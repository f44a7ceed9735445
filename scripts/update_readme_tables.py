"""Rewrite the generated tables of README.md from the declarations (run by `make docs`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from forkserve.config import markdown_table
from forkserve.master.signals import signal_table
from forkserve.serving.signals import role_tables

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = {"settings-table": markdown_table, "signal-table": signal_table,
          "role-signal-table": role_tables}


def main() -> int:
    text = README.read_text()
    for marker, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
        text, n = pattern.subn(start + make().replace("\\", "\\\\") + end, text)
        if n != 1:
            print(f"README.md: marker {marker} not found exactly once", file=sys.stderr)
            return 1
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
