"""Line framing, sans-I/O: bytes in, complete lines out, with a hard cap on buffered bytes.

Rules
-----
1. A line ends at ``b"\\n"``; the returned line keeps it (like ``io`` readline), so an app
   that echoes a line is byte-exact, ``b"\\r\\n"`` included.
2. No line may exceed ``max_line`` bytes, not counting its ``b"\\n"``. The framer never holds
   more than ``max_line`` bytes of an incomplete line: the moment a partial line is longer, it
   raises ``LineTooLong`` (so a client cannot make the server buffer without bound).
3. Lines that completed before the bad one are not lost: ``LineTooLong.complete`` carries them,
   so a server answers every good line and then reports the error.
4. How the input was split across ``feed`` calls never matters (tested with hypothesis).
5. At the end of the stream, ``end()`` returns an unterminated last line, if any: a client that
   half-closes after its last line still wants the answer (RFC 9112 section 9.6).

Worst case: ``feed`` copies at most ``max_line`` buffered bytes once per call.
"""

from __future__ import annotations

from ..errors import LineTooLong


class LineFramer:
    """Split a byte stream into lines. Not thread-safe; one per connection."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_line: int) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._max = max_line
        self._buf = b""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held now (never more than ``max_line``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the lines it completes, in order.

        Raises ``LineTooLong`` (with the lines completed before it) when a line is too long.
        """
        if self._buf:
            data = self._buf + data
        nl = data.find(b"\n")
        if nl < 0:
            if len(data) > self._max:
                self._buf = b""
                raise LineTooLong(self._max)
            self._buf = data
            return []
        if nl == len(data) - 1:  # the common case: exactly one whole line
            self._buf = b""
            if nl > self._max:
                raise LineTooLong(self._max)
            return [data]
        parts = data.split(b"\n")
        rest = parts.pop()
        lines: list[bytes] = []
        for part in parts:
            if len(part) > self._max:
                self._buf = b""
                raise LineTooLong(self._max, lines)
            lines.append(part + b"\n")
        if len(rest) > self._max:
            self._buf = b""
            raise LineTooLong(self._max, lines)
        self._buf = rest
        return lines

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` bytes of the incomplete line (for raw reads)."""
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def end(self) -> bytes | None:
        """The stream ended: return the unterminated last line, or ``None``."""
        rest, self._buf = self._buf, b""
        return rest or None
