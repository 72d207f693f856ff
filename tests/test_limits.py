"""TokenBucket, SlidingCount and Allowance as arithmetic on explicit `now` values (no clock, no sleeping)."""

from __future__ import annotations

import random

import pytest

from fluxrt_trio.protocol.limits import WINDOW, Allowance, SlidingCount, TokenBucket, Verdict

# ---- TokenBucket ---------------------------------------------------------------------------------------------


def test_bucket_starts_full_and_empties():
    bucket = TokenBucket(5)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.tokens == pytest.approx(0.0)


def test_bucket_refills_continuously_at_capacity_per_period():
    bucket = TokenBucket(60, period=60.0)  # one token per second
    for _ in range(60):
        assert bucket.take(100.0)
    assert not bucket.take(100.0)
    assert not bucket.take(100.5)  # half a token is not a token
    assert bucket.take(101.0)  # one second later: one token
    assert not bucket.take(101.0)
    assert bucket.take(103.0)
    assert bucket.take(103.0)
    assert not bucket.take(103.0)


def test_bucket_holds_at_most_its_capacity():
    bucket = TokenBucket(10)
    bucket.take(0.0)
    # An hour of idling refills at most `capacity` tokens.
    bucket.take(3600.0)
    assert bucket.tokens == pytest.approx(9.0)
    assert sum(bucket.take(3600.0) for _ in range(20)) == 9


def test_bucket_take_amount():
    bucket = TokenBucket(10)
    assert bucket.take(0.0, amount=7)
    assert not bucket.take(0.0, amount=4)
    assert bucket.tokens == pytest.approx(3.0)  # a refused take costs nothing
    assert bucket.take(0.0, amount=3)


def test_bucket_ignores_time_going_backwards():
    bucket = TokenBucket(2)
    assert bucket.take(10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.tokens == pytest.approx(0.0)


# ---- SlidingCount --------------------------------------------------------------------------------------------


def test_sliding_count_within_the_first_window():
    count = SlidingCount()
    assert [count.add(t) for t in (0.0, 1.0, 59.0)] == [1, 2, 3]


def test_sliding_count_is_exact_over_the_last_minute():
    count = SlidingCount(window=60.0)
    assert [count.add(t) for t in (0.0, 30.0, 59.0)] == [1, 2, 3]
    # At 60 s the event at 0 s has left the window; the ones at 30 s and 59 s have not.
    assert count.add(60.0) == 3
    assert count.add(89.5) == 4
    assert count.add(90.0) == 4  # 30 s has left
    assert count.add(119.0) == 4  # 59, 60, 89.5, 90, 119 minus 59
    assert count.add(180.0) == 1


def test_sliding_count_many_events_in_one_second():
    count = SlidingCount()
    assert [count.add(5.0) for _ in range(500)][-1] == 500
    assert count.add(64.9) == 501
    assert count.add(65.0) == 2  # the 500 at 5 s have left; the one at 64.9 s has not


def test_sliding_count_forgets_after_two_windows():
    count = SlidingCount(window=60.0)
    for _ in range(100):
        count.add(0.0)
    assert count.add(121.0) == 1


def test_sliding_count_matches_a_count_of_timestamps():
    # Against the plain definition: the events whose second is within the last `window` seconds, one second at a
    # time or with gaps, in bursts within a second, and with gaps of a window or more that empty it.
    rng = random.Random(16)
    for _ in range(200):
        count, seen, now = SlidingCount(window=10.0), [], 0.0
        for _ in range(60):
            now += rng.choice((0.0, 0.3, 1.0, 2.5, 9.0, 10.0, 12.0))
            seen.append(int(now))
            assert count.add(now) == sum(1 for s in seen if s > int(now) - 10)


def test_sliding_count_holds_no_ring_while_its_events_share_one_second():
    count = SlidingCount(window=60.0)
    assert [count.add(t) for t in (5.0, 5.2, 5.9)] == [1, 2, 3]
    assert count.add(70.0) == 1  # the three have left the window
    assert count._slots is None  # the point: a client that subscribes as it connects and then idles holds no ring
    assert count.add(71.0) == 2
    assert count._slots is not None


# ---- Allowance -----------------------------------------------------------------------------------------------


def test_allowance_exhausted_rejects():
    allowance = Allowance(100)
    verdicts = [allowance.charge(0.0) for _ in range(101)]
    assert verdicts == [Verdict.ALLOW] * 100 + [Verdict.REJECT]


def test_allowance_refills_over_time():
    allowance = Allowance(100)  # 100 per minute: one token per 0.6 s
    for _ in range(100):
        assert allowance.charge(0.0) is Verdict.ALLOW
    assert allowance.charge(0.3) is Verdict.REJECT
    assert allowance.charge(0.9) is Verdict.ALLOW  # 0.9 s * 100/60 = 1.5 tokens
    assert allowance.charge(0.9) is Verdict.REJECT
    # A minute later the bucket is full again.
    assert [allowance.charge(61.0) for _ in range(90)] == [Verdict.ALLOW] * 90
    assert allowance.bucket.tokens == pytest.approx(10.0)


def test_allowance_is_whole_again_after_a_quiet_period():
    allowance = Allowance(100)
    assert [allowance.charge(0.0) for _ in range(100)] == [Verdict.ALLOW] * 100
    assert [allowance.charge(150.0) for _ in range(101)] == [Verdict.ALLOW] * 100 + [Verdict.REJECT]


def test_allowance_capacity_is_one_minutes_worth():
    allowance = Allowance(100)
    allowance.charge(0.0)
    # Ten idle minutes do not buy a burst of 1000.
    verdicts = [allowance.charge(600.0) for _ in range(150)]
    assert verdicts.count(Verdict.ALLOW) == 100
    assert verdicts[100:] == [Verdict.REJECT] * 50


def test_more_than_twice_the_allowance_within_a_minute_closes():
    allowance = Allowance(100)
    verdicts = [allowance.charge(0.0) for _ in range(201)]
    assert verdicts[:100] == [Verdict.ALLOW] * 100
    assert verdicts[100:200] == [Verdict.REJECT] * 100
    assert verdicts[200] is Verdict.CLOSE


def test_flood_spread_over_a_minute_closes():
    allowance = Allowance(10)
    verdicts = [allowance.charge(i * 2.5) for i in range(21)]  # 21 messages in 50 s, twice the allowance is 20
    assert verdicts[-1] is Verdict.CLOSE
    assert Verdict.CLOSE not in verdicts[:-1]


def test_twice_the_allowance_is_not_yet_a_flood():
    allowance = Allowance(100)
    verdicts = [allowance.charge(0.0) for _ in range(200)]
    assert Verdict.CLOSE not in verdicts


def test_flood_straddling_a_window_boundary_closes():
    allowance = Allowance(100)
    allowance.charge(0.0)  # starts the counting window
    burst = [allowance.charge(59.99) for _ in range(199)]  # 200 messages so far: twice the allowance, not more
    assert Verdict.CLOSE not in burst
    # 50 s later the 199 are still within the last minute: one more is 200, the next one is a flood.
    verdicts = [allowance.charge(110.0) for _ in range(2)]
    assert verdicts[0] is not Verdict.CLOSE
    assert verdicts[1] is Verdict.CLOSE


def test_a_past_burst_does_not_close_a_client_a_minute_later():
    allowance = Allowance(100)
    # 150 messages at t=0 (1.5 times the allowance: 50 rejected, no flood) ...
    assert [allowance.charge(0.0) for _ in range(150)].count(Verdict.ALLOW) == 100
    # ... then, 70 s later, the full allowance again: only these 100 lie within the last minute.
    assert [allowance.charge(70.0) for _ in range(100)] == [Verdict.ALLOW] * 100


def test_refilled_allowance_is_usable_without_being_closed():
    allowance = Allowance(100)
    for _ in range(100):
        allowance.charge(0.0)
    for now in (0.3, 0.9, 0.9):
        allowance.charge(now)
    # Within the minute before 61 s there are at most 3 earlier messages plus these: far below 200.
    assert [allowance.charge(61.0) for _ in range(100)] == [Verdict.ALLOW] * 100


def test_slow_steady_senders_are_never_rejected():
    allowance = Allowance(100)
    # Exactly the allowance, evenly spaced, for an hour.
    for i in range(6000):
        assert allowance.charge(i * 0.6) is Verdict.ALLOW, i


def test_steady_sender_below_the_rate_is_never_rejected():
    allowance = Allowance(60)
    for i in range(3600):
        assert allowance.charge(i * 1.5) is Verdict.ALLOW, i


def test_a_full_burst_every_minute_is_never_rejected_nor_closed():
    allowance = Allowance(100)
    for minute in range(10):
        now = minute * WINDOW
        assert [allowance.charge(now) for _ in range(100)] == [Verdict.ALLOW] * 100, minute


def test_rejected_messages_count_toward_the_flood():
    allowance = Allowance(5)
    verdicts = [allowance.charge(float(i) / 100) for i in range(11)]
    assert verdicts == [Verdict.ALLOW] * 5 + [Verdict.REJECT] * 5 + [Verdict.CLOSE]


def test_allowance_bucket_matches_per_minute():
    allowance = Allowance(250)
    assert allowance.bucket.capacity == 250
    assert allowance.bucket.period == WINDOW == 60.0
