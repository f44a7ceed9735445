"""conn-cost.py - what one new connection costs a forking server: page faults and CPU time of
the master and of its children, per connection, under ``loadgen -m connect -c 10`` (3 s).

    .venv/bin/python scripts/conn-cost.py PORT CMD [ARG...]     (PORT in ARGs is replaced)

The master's own counters and those of the children it has reaped (``cminflt``, ``cutime``,
``cstime`` in /proc/PID/stat) are read before and after the load; the load generator is
``$BENCH/loadgen`` (default /tmp/fsbench, built by scripts/bench-seed.sh). Start the server
with nothing else on the machine for figures comparable within one sitting.
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
    # after the ")": state is field 0; minflt 7, cminflt 8, utime 11, stime 12, cutime 13, ...
    return (int(fields[7]), int(fields[8]), (int(fields[11]) + int(fields[12])) / TICKS,
            (int(fields[13]) + int(fields[14])) / TICKS)


def main() -> int:
    if len(sys.argv) < 3:
        print((__doc__ or "").strip(), file=sys.stderr)
        return 2
    port = sys.argv[1]
    loadgen = os.path.join(os.environ.get("BENCH", "/tmp/fsbench"), "loadgen")
    cmd = [arg.replace("PORT", port) for arg in sys.argv[2:]]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.5)
        before = counters(server.pid)
        out = subprocess.run([loadgen, "-p", port, "-m", "connect", "-c", "10", "-d", "3",
                              "-w", "0"], check=True, capture_output=True, text=True,
                             timeout=30).stdout
        after = counters(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
    result = json.loads(out.splitlines()[0])
    n = max(result["ok"], 1)
    faults = [(b - a) / n for a, b in zip(before[:2], after[:2], strict=True)]
    cpu = [(b - a) / n * 1e6 for a, b in zip(before[2:], after[2:], strict=True)]
    print(f"{result['rps']:,.0f} connections/s, errors {result['errors']}, timeouts "
          f"{result['timeouts']}; per connection: master {faults[0]:.0f} faults "
          f"{cpu[0]:.0f} us CPU, children {faults[1]:.0f} faults {cpu[1]:.0f} us CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
