"""Line framing: vectors fed whole, byte by byte and split anywhere (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserve.errors import LineTooLong
from forkserve.protocol.framing import LineFramer


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += framer.feed(chunk)
    last = framer.end()
    return out + ([last] if last is not None else [])


def reference_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    rest = lines.pop()
    return [line + b"\n" for line in lines] + ([rest] if rest else [])


VECTORS = [
    (b"", []),
    (b"a\n", [b"a\n"]),
    (b"a\nb\n", [b"a\n", b"b\n"]),
    (b"\n\n", [b"\n", b"\n"]),
    (b"crlf\r\n", [b"crlf\r\n"]),
    (b"no newline", [b"no newline"]),
    (b"a\nrest", [b"a\n", b"rest"]),
]


@pytest.mark.parametrize(("data", "lines"), VECTORS)
def test_vectors_whole_and_byte_by_byte(data: bytes, lines: list[bytes]) -> None:
    assert feed_all(LineFramer(100), [data]) == lines
    assert feed_all(LineFramer(100), [data[i : i + 1] for i in range(len(data))]) == lines


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_any_split_gives_the_same_lines(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert feed_all(LineFramer(1000), chunks) == reference_lines(data)


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), min_size=1,
                max_size=8),
       st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=7))
def test_lines_over_the_limit_raise_after_the_good_ones(parts: list[bytes], limit: int,
                                                        step: int) -> None:
    data = b"".join(p + b"\n" for p in parts)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    framer = LineFramer(limit)
    got: list[bytes] = []
    try:
        for chunk in chunks:
            got += framer.feed(chunk)
            assert framer.buffered <= limit, "never buffers more than max_line"
    except LineTooLong as exc:
        got += exc.complete
        first_bad = next(i for i, p in enumerate(parts) if len(p) > limit)
        assert got == [p + b"\n" for p in parts[:first_bad]]
    else:
        assert all(len(p) <= limit for p in parts)
        assert got == [p + b"\n" for p in parts]


def test_a_partial_line_over_the_limit_raises_before_its_newline() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abcd") == []
    with pytest.raises(LineTooLong):
        framer.feed(b"e")


def test_exactly_max_line_is_allowed() -> None:
    assert LineFramer(3).feed(b"abc\n") == [b"abc\n"]
    assert LineFramer(3).feed(b"ab\nabc\nx") == [b"ab\n", b"abc\n"], "among others too"
    with pytest.raises(LineTooLong):
        LineFramer(3).feed(b"abcd\n")


def test_a_partial_line_after_whole_ones_is_held_up_to_max_line() -> None:
    # (mutmut survivors: `len(rest) >= max` and the lines a LineTooLong carries on this path)
    framer = LineFramer(4)
    assert framer.feed(b"x\nabcd") == [b"x\n"]
    assert framer.buffered == 4
    assert framer.feed(b"\n") == [b"abcd\n"]
    with pytest.raises(LineTooLong) as too_long:
        framer.feed(b"ok\nabcde")
    assert too_long.value.complete == [b"ok\n"]
    assert framer.buffered == 0, "nothing of the bad line is kept"
    assert framer.feed(b"ab") == []
    assert framer.end() == b"ab"
    assert framer.end() is None


#: (max_line, chunks fed in turn, lines returned before the error, lines the LineTooLong
#: carries): each path by which a line can be too long (mutmut survivors: the limit and the
#: lines the error carries, and what the framer holds afterwards, went unchecked).
TOO_LONG = [
    (4, [b"abcde"], [], []),  # a partial line, no newline yet
    (4, [b"abcd", b"e"], [], []),  # ... that grows too long across feeds
    (3, [b"abcd\n"], [], []),  # exactly one whole line in the chunk
    (4, [b"ok\nabcdef\nnext\n"], [], [b"ok\n"]),  # a whole line among others
    (4, [b"ok\nabcde"], [], [b"ok\n"]),  # the partial line after whole ones
    (4, [b"x\n", b"ok\nabcde"], [b"x\n"], [b"ok\n"]),
]


@pytest.mark.parametrize(("limit", "chunks", "before", "carried"), TOO_LONG)
def test_a_line_too_long_names_its_limit_carries_the_good_lines_and_leaves_nothing(
        limit: int, chunks: list[bytes], before: list[bytes], carried: list[bytes]) -> None:
    framer = LineFramer(limit)
    got: list[bytes] = []
    for chunk in chunks[:-1]:
        got += framer.feed(chunk)
    with pytest.raises(LineTooLong, match=rf"^line longer than {limit} bytes$") as too_long:
        framer.feed(chunks[-1])
    assert got == before
    assert too_long.value.limit == limit
    assert too_long.value.complete == carried
    assert framer.buffered == 0, "nothing of the bad line is kept"
    assert framer.feed(b"ab") == []
    assert framer.feed(b"\n") == [b"ab\n"], "the next line is framed afresh"


@pytest.mark.parametrize("limit", [0, -1])
def test_max_line_below_one_is_refused_with_the_reason(limit: int) -> None:
    with pytest.raises(ValueError, match=r"^max_line must be at least 1$"):
        LineFramer(limit)


def test_a_new_framer_holds_nothing_and_take_hands_over_the_partial_line() -> None:
    framer = LineFramer(10)
    assert framer.buffered == 0
    assert framer.take(3) == b""
    assert framer.end() is None
    assert framer.feed(b"abcdef") == []
    assert framer.take(2) == b"ab"
    assert framer.buffered == 4
    assert framer.take(10) == b"cdef"
    assert framer.buffered == 0
    assert framer.feed(b"g\n") == [b"g\n"], "what was taken is not framed again"
