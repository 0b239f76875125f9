"""The share of the cores each of several concurrent generations gets."""

from __future__ import annotations

import pytest

from modeld.manager.threads import thread_share


@pytest.mark.parametrize(
    ("alone", "running", "share"),
    [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 3, 5), (16, 2, 8), (1, 4, 1), (8, 0, 8), (0, 3, 0)],
)
def test_each_gets_its_share_and_never_zero(alone: int, running: int, share: int) -> None:
    assert thread_share(alone, running) == share
