"""The documented exit codes and the mapping of daemon error codes onto them."""

from __future__ import annotations

import pytest

from modelctl.client import DaemonError, DaemonTimeout, Endpoint, ProtocolError, Unreachable
from modelctl.exitcodes import ExitCode, exit_code_for, for_error_code


def test_values_are_the_documented_ones() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "ERROR": 1,
        "USAGE": 2,
        "MODEL_NOT_FOUND": 3,
        "BUSY": 4,
        "UNREACHABLE": 5,
        "INTERRUPTED": 130,
    }


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        ("model_not_found", ExitCode.MODEL_NOT_FOUND),
        ("queue_full", ExitCode.BUSY),
        ("queue_timeout", ExitCode.BUSY),
        ("overloaded", ExitCode.BUSY),
        ("model_load_failed", ExitCode.ERROR),
        ("insufficient_vram", ExitCode.ERROR),
        ("something_new", ExitCode.ERROR),
    ],
)
def test_daemon_codes(code: str, exit_code: ExitCode) -> None:
    assert for_error_code(code) is exit_code
    assert exit_code_for(DaemonError(code, "m")) is exit_code


def test_client_failures() -> None:
    assert exit_code_for(Unreachable(Endpoint.unix("/x"), "gone")) is ExitCode.UNREACHABLE
    assert exit_code_for(ProtocolError("bad")) is ExitCode.ERROR
    assert exit_code_for(DaemonTimeout("slow")) is ExitCode.ERROR
