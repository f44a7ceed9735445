"""An app that imports in the master but not in a zygote (issue 16's boot-failure test): it
stands for an app whose import depends on something only the master's process has."""

import sys

if "forkserve.serving.zygote" in sys.argv[0] or sys.argv[0].endswith("zygote.py"):
    raise RuntimeError("this app cannot start in a fresh interpreter")


def handle(conn: object) -> None:
    pass
