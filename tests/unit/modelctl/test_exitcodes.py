"""The documented exit codes and the mapping of daemon error codes onto them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelctl.client import DaemonError, DaemonTimeout, Endpoint, ProtocolError, Unreachable
from modelctl.exitcodes import ExitCode, exit_code_for, for_error_code

DOCS = Path(__file__).resolve().parents[3] / "docs" / "modelctl.md"
TABLE_ROW = re.compile(r"^\| (\d+) \| `([A-Z_]+)` \| (.+) \|$", re.MULTILINE)


def documented_rows() -> dict[str, tuple[int, str]]:
    section = DOCS.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {name: (int(code), when) for code, name, when in TABLE_ROW.findall(section)}


def test_values_are_the_documented_ones() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "ERROR": 1,
        "USAGE": 2,
        "MODEL_NOT_FOUND": 3,
        "BUSY": 4,
        "UNREACHABLE": 5,
        "INTERRUPTED": 130,
        "BROKEN_PIPE": 141,
    }


def test_the_docs_table_is_the_enum() -> None:
    rows = documented_rows()
    assert {name: code for name, (code, _) in rows.items()} == {c.name: int(c) for c in ExitCode}


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        ("invalid_request", ExitCode.USAGE),
        ("no_default_model", ExitCode.USAGE),
        ("model_not_found", ExitCode.MODEL_NOT_FOUND),
        ("queue_full", ExitCode.BUSY),
        ("queue_timeout", ExitCode.BUSY),
        ("overloaded", ExitCode.BUSY),
        ("model_load_failed", ExitCode.ERROR),
        ("insufficient_vram", ExitCode.ERROR),
        ("prompt_too_long", ExitCode.ERROR),
        ("bad_request", ExitCode.ERROR),
        ("something_new", ExitCode.ERROR),
    ],
)
def test_daemon_codes(code: str, exit_code: ExitCode) -> None:
    assert for_error_code(code) is exit_code
    assert exit_code_for(DaemonError(code, "m")) is exit_code
    if exit_code is not ExitCode.ERROR:  # the table names every code with an exit code of its own
        assert f"`{code}`" in documented_rows()[exit_code.name][1]


def test_client_failures() -> None:
    assert exit_code_for(Unreachable(Endpoint.unix("/x"), "gone")) is ExitCode.UNREACHABLE
    assert exit_code_for(ProtocolError("bad")) is ExitCode.ERROR
    assert exit_code_for(DaemonTimeout("slow")) is ExitCode.ERROR
