"""A fake kernel with a virtual clock, for supervisor logic (STYLE rule 6)."""

from __future__ import annotations

from collections import deque


class FakeKernel:
    """Forks hand out pids; kills are recorded; exits are injected; time moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = 100
        self.live: set[int] = set()
        self.killed: list[tuple[int, int]] = []
        self.exits: deque[tuple[int, int]] = deque()
        self.fork_error: OSError | None = None

    def fork(self) -> int:
        if self.fork_error is not None:
            raise self.fork_error
        self.next_pid += 1
        self.live.add(self.next_pid)
        return self.next_pid

    def spawn(self, path: str, argv: list[str], env: dict[str, str]) -> int:
        return self.fork()

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.live:
            raise ProcessLookupError(pid)
        self.killed.append((pid, sig))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        if pid > 0:  # that child only: its exit, or 0 while it runs, or not a child
            for done, status in self.exits:
                if done == pid:
                    self.exits.remove((done, status))
                    self.live.discard(done)
                    return done, status
            if pid in self.live:
                return 0, 0
            raise ChildProcessError(pid)
        if self.exits:
            done, status = self.exits.popleft()
            self.live.discard(done)
            return done, status
        if not self.live:
            raise ChildProcessError
        return 0, 0

    def monotonic(self) -> float:
        return self.now

    # -- injection helpers
    def exit(self, pid: int, code: int = 0) -> None:
        self.exits.append((pid, code << 8))

    def die(self, pid: int, sig: int) -> None:
        self.exits.append((pid, sig))
