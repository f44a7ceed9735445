"""zygote_cost.py - what one new connection costs, split by process: the master, the zygote
(the master's one long-lived child, if it has one) and the serving children, in page faults
and CPU time per connection, under ``loadgen -m connect -c 10`` (3 s after 1 s of warm-up;
``CONNS=N`` for another number of clients).

    .venv/bin/python scripts/zygote_cost.py PORT CMD [ARG...]     (PORT in ARGs is replaced)

The counters come from /proc/PID/stat: the master's and the zygote's own (``minflt``,
``utime``, ``stime``) and those of the children each has reaped (``cminflt``, ``cutime``,
``cstime``); the children's are the zygote's reaped ones if there is a zygote, else the
master's. Like scripts/conn-cost.py (issue 6), with the zygote split out (issue 16).
The load generator is ``$BENCH/loadgen`` (default /tmp/fsbench-d).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def counters(pid: int) -> tuple[int, int, float, float]:
    """Minor faults of the process and of its reaped children, and their CPU seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[7]), int(fields[8]), (int(fields[11]) + int(fields[12])) / TICKS,
            (int(fields[13]) + int(fields[14])) / TICKS)


def zygote_of(master: int) -> int | None:
    """The master's oldest live child (the zygote), if it has children at rest."""
    with open(f"/proc/{master}/task/{master}/children") as fh:
        kids = sorted(int(pid) for pid in fh.read().split())
    return kids[0] if kids else None


def main() -> int:
    if len(sys.argv) < 3:
        print((__doc__ or "").strip(), file=sys.stderr)
        return 2
    port = sys.argv[1]
    loadgen = os.path.join(os.environ.get("BENCH", "/tmp/fsbench-d"), "loadgen")
    cmd = [arg.replace("PORT", port) for arg in sys.argv[2:]]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(1.0)
        zygote = zygote_of(server.pid)
        pids = [server.pid] + ([zygote] if zygote else [])
        before = [counters(pid) for pid in pids]
        conns = os.environ.get("CONNS", "10")
        out = subprocess.run([loadgen, "-p", port, "-m", "connect", "-c", conns, "-d", "3",
                              "-w", "1"], check=True, capture_output=True, text=True,
                             timeout=30).stdout
        time.sleep(0.3)  # the last children reaped
        after = [counters(pid) for pid in pids]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
    result = json.loads(out.splitlines()[0])
    n: int = max(int(result["ok"]), 1)

    def per(i: int, field: int) -> float:
        return float(after[i][field] - before[i][field]) / n

    parts = [("master", per(0, 0), per(0, 2))]
    if zygote:
        parts.append(("zygote", per(1, 0), per(1, 2)))
        parts.append(("children", per(1, 1), per(1, 3)))
    else:
        parts.append(("children", per(0, 1), per(0, 3)))
    text = ", ".join(f"{name} {faults:.0f} faults {cpu * 1e6:.0f} us" for name, faults, cpu
                     in parts)
    print(f"{result['rps']:,.0f} connections/s (errors {result['errors']}, timeouts "
          f"{result['timeouts']}); per connection: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
