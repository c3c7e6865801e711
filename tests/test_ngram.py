"""Prompt lookup finds the latest earlier occurrence of the longest suffix."""

from __future__ import annotations

from draft_service.ngram import NgramConfig, lookup


def test_longest_suffix_wins():
    history = [1, 2, 3, 9, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(history, 3, NgramConfig(max_ngram=3)) == [9, 2, 3]


def test_latest_occurrence_wins():
    history = [5, 1, 5, 2, 5]
    assert lookup(history, 2, NgramConfig(max_ngram=1)) == [2, 5]


def test_no_match_and_no_room():
    assert lookup([1, 2, 3], 4, NgramConfig()) == []
    assert lookup([1, 2, 1, 2], 0, NgramConfig()) == []
