"""A short soak (`bench.soak` with 300 requests): the same mix and pass criteria as `make soak`."""

from __future__ import annotations

from pathlib import Path

from bench import soak

REQUESTS = 300  # 30 rounds, 15 per model: about 5 s here, so it fits the test suite
MAX_SECONDS = 120.0  # the run stops itself (and fails) if it takes longer than this


def test_a_short_soak_passes(tmp_path: Path) -> None:
    report = soak.run(soak.SoakConfig(REQUESTS, MAX_SECONDS, workdir=tmp_path / "soak"))
    print(report.summary())
    assert report.passed, report.summary()
    assert sum(report.sent.values()) == REQUESTS
    assert set(report.sent) == set(soak.KINDS)
    assert report.samples, "the sampler took no samples"
