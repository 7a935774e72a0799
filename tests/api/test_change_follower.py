"""The status-change follower processes rows that commit out of id order exactly once."""

from __future__ import annotations

from fleettrust.api.gateway import ChangeFollower


def row(i: int) -> tuple[int, str | None, str]:
    return (i, f"d{i}", "suspended")


def test_late_commit_below_a_newer_row_is_not_skipped() -> None:
    f = ChangeFollower(10)
    # id 11 is still uncommitted; 12 is visible first
    assert f.new([row(12)], now=0.0) == [row(12)]
    assert f.floor == 10
    # the next poll (from the floor) sees 11 late and 12 again: only 11 is new
    assert f.new([row(11), row(12)], now=1.0) == [row(11)]
    assert f.floor == 12
    assert f.new([], now=2.0) == []


def test_rolled_back_gap_is_given_up_after_the_wait() -> None:
    f = ChangeFollower(0)
    assert f.new([row(2), row(3)], now=0.0) == [row(2), row(3)]
    assert f.floor == 0
    assert f.new([row(2), row(3)], now=10.0) == []
    assert f.floor == 0
    assert f.new([row(2), row(3)], now=10.0 + ChangeFollower.GAP_WAIT_S + 1) == []
    assert f.floor == 3
    assert f.new([row(4)], now=50.0) == [row(4)]
    assert f.floor == 4


def test_in_order_rows_advance_the_floor() -> None:
    f = ChangeFollower(5)
    assert [r[0] for r in f.new([row(6), row(7), row(8)], now=0.0)] == [6, 7, 8]
    assert f.floor == 8
    assert not f.seen
