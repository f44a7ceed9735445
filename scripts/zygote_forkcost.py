"""zygote_forkcost.py - what ``fork()``, ``_exit(0)`` and ``waitpid`` cost a process as large
as the zygote (its imports and the app loaded, ``gc.freeze()``d) against a bare interpreter:
the parent's CPU, the child's CPU and the child's page faults per fork, 300 forks (issue 16).

    .venv/bin/python scripts/zygote_forkcost.py bare|zygote [ROUNDS]
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time

FORKS = 300


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "zygote"
    if what == "zygote":
        import forkserve.serving.zygote  # noqa: F401, PLC0415
        from forkserve.serving.handlers import load  # noqa: PLC0415

        load("hello")
    gc.collect()
    gc.freeze()
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        t0 = time.process_time()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(FORKS):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        t1 = time.process_time()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open("/proc/self/status") as fh:
            rss = fh.read().split("VmRSS:")[1].split()[0]
        child = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        print(f"{what}: RSS {rss} KB; per fork: parent {1e6 * (t1 - t0) / FORKS:.0f} us, "
              f"child {1e6 * child / FORKS:.0f} us, "
              f"{(r1.ru_minflt - r0.ru_minflt) / FORKS:.0f} faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
