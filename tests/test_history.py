"""protocol/history.py as values: what a resuming client gets back, bounded by size and by age, and what it costs."""

from __future__ import annotations

import pytest

from fluxrt_trio.protocol.history import History

TTL = 60.0


def frame(n: int) -> bytes:
    return f"m{n}".encode()


def filled(history: History, channel: str, numbers: range, now: float = 0.0) -> None:
    for n in numbers:
        history.add(channel, (0, n), now, frame(n))


def test_what_followed_a_position_comes_back_in_order_and_nothing_before_it() -> None:
    history = History(10, TTL)
    filled(history, "broadcast:a", range(1, 6))
    assert history.after("broadcast:a", (0, 2), 1.0) == [frame(3), frame(4), frame(5)]
    assert history.after("broadcast:a", (0, 5), 1.0) == []
    # The first message's own position, and the one before every message.
    assert history.after("broadcast:a", (0, 0), 1.0) == [frame(n) for n in range(1, 6)]


def test_channels_are_apart() -> None:
    history = History(10, TTL)
    for n in range(1, 7):
        history.add("broadcast:a" if n % 2 else "broadcast:b", (0, n), 0.0, frame(n))
    assert history.after("broadcast:a", (0, 1), 0.0) == [frame(3), frame(5)]
    assert history.after("broadcast:b", (0, 1), 0.0) == [frame(2), frame(4), frame(6)]


def test_size_keeps_the_newest_and_a_position_before_what_was_pushed_out_cannot_resume() -> None:
    history = History(3, TTL)
    filled(history, "broadcast:a", range(1, 11))
    assert history.messages == 3
    assert history.after("broadcast:a", (0, 7), 0.0) == [frame(8), frame(9), frame(10)]
    # 7 itself is gone, but nothing after it: the client that saw 7 misses nothing.
    assert history.after("broadcast:a", (0, 6), 0.0) is None
    assert history.after("broadcast:a", (0, 1), 0.0) is None


def test_ttl_drops_old_messages_lazily_and_the_gap_is_known() -> None:
    history = History(100, TTL)
    filled(history, "broadcast:a", range(1, 4), now=0.0)
    filled(history, "broadcast:a", range(4, 6), now=50.0)
    # At 70 s, 1 to 3 are older than a minute; 4 and 5 are not.
    assert history.after("broadcast:a", (0, 3), 70.0) == [frame(4), frame(5)]
    assert history.after("broadcast:a", (0, 2), 70.0) is None
    assert history.messages == 2


def test_a_channel_whose_newest_expired_goes_whole_and_its_old_positions_cannot_resume() -> None:
    history = History(100, TTL)
    filled(history, "broadcast:quiet", range(1, 4), now=0.0)
    history.add("broadcast:busy", (0, 4), 10.0, frame(4))
    history.sweep(65.0)
    assert history.channels == 1
    assert history.messages == 1
    # The quiet channel's ring is gone: even its newest message's client cannot know whether it missed one.
    assert history.after("broadcast:quiet", (0, 3), 65.0) is None
    # A channel that starts again starts above what expired.
    history.add("broadcast:quiet", (0, 5), 66.0, frame(5))
    assert history.after("broadcast:quiet", (0, 3), 66.0) is None
    assert history.after("broadcast:quiet", (0, 4), 66.0) == [frame(5)]


def test_a_channel_never_used_is_resumable_from_any_position_above_what_expired() -> None:
    history = History(100, TTL)
    assert history.after("broadcast:new", (0, 7), 0.0) == []
    filled(history, "broadcast:old", range(1, 3), now=0.0)
    history.sweep(100.0)
    # Up to just above the newest message that expired (its client cannot tell whether something followed).
    assert history.after("broadcast:new", (0, 2), 100.0) is None
    assert history.after("broadcast:new", (0, 3), 100.0) == []


def test_a_message_out_of_order_is_not_kept_and_nobody_resumes_across_it() -> None:
    history = History(100, TTL)
    history.add("broadcast:a", (1, 0), 0.0, frame(1))
    history.add("broadcast:a", (3, 0), 0.0, frame(3))
    history.add("broadcast:a", (2, 0), 0.0, frame(2))
    assert history.messages == 2
    assert history.after("broadcast:a", (1, 0), 0.0) is None
    assert history.after("broadcast:a", (2, 0), 0.0) == [frame(3)]


def test_messages_and_bytes_follow_what_is_kept() -> None:
    history = History(2, TTL)
    history.add("broadcast:a", (0, 1), 0.0, b"x" * 10)
    history.add("broadcast:a", (0, 2), 0.0, b"x" * 20)
    history.add("broadcast:b", (0, 3), 30.0, b"x" * 5)
    assert (history.messages, history.bytes, history.channels) == (3, 35, 2)
    history.add("broadcast:a", (0, 4), 40.0, b"x" * 1)
    assert (history.messages, history.bytes) == (3, 26)
    # At 70 s, a's message of time 0 is older than a minute: it goes when a is next used.
    assert history.after("broadcast:a", (0, 2), 70.0) == [b"x"]
    assert (history.messages, history.bytes) == (2, 6)
    history.sweep(200.0)
    assert (history.messages, history.bytes, history.channels) == (0, 0, 0)


def test_memory_stays_bounded_under_many_channels_each_used_once() -> None:
    history = History(5, TTL)
    for n in range(1, 10_001):
        history.add(f"broadcast:c{n}", (0, n), n / 100, frame(n))
    # A message per channel every 10 ms: only the last minute's channels are left.
    assert history.channels == history.messages <= 6001
    assert history.after("broadcast:c1", (0, 1), 100.0) is None
    assert history.after("broadcast:c10000", (0, 9999), 100.0) == [frame(10000)]


@pytest.mark.parametrize(("size", "ttl"), [(0, TTL), (-1, TTL), (1, 0.0)])
def test_a_history_keeps_something(size: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        History(size, ttl)
