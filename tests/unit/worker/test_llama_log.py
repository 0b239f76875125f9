"""How the worker routes llama.cpp's log lines (no model, no backend: the router alone)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from modeld.worker import llama_log

ERROR, WARN, CONT = llama_log.LOG_ERROR_LEVEL, 3, llama_log.LOG_CONT_LEVEL

Installer = Callable[[bool], llama_log._LlamaLog]


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Installer:
    """Make a router (debugging or not) the process's, as init_backend would."""

    def install(debug: bool) -> llama_log._LlamaLog:
        log = llama_log._LlamaLog(debug=debug)
        monkeypatch.setattr(llama_log, "_log", log)
        return log

    return install


def test_only_errors_are_written_when_not_debugging(
    capfd: pytest.CaptureFixture[str], installed: Installer
) -> None:
    log = installed(False)
    log._on_log(WARN, b"a warning\n", None)
    log._on_log(ERROR, b"an error ", None)
    log._on_log(CONT, b"continued\n", None)
    assert capfd.readouterr().err == "an error continued\n"


def test_held_errors_are_written_at_the_end_unless_dropped(
    capfd: pytest.CaptureFixture[str], installed: Installer
) -> None:
    log = installed(False)
    with llama_log.held() as expected:
        log._on_log(ERROR, b"decode aborted\n", None)
        assert capfd.readouterr().err == ""  # nothing written while held
        expected.drop()
    assert capfd.readouterr().err == ""
    with llama_log.held():
        log._on_log(ERROR, b"a real failure\n", None)
        assert capfd.readouterr().err == ""
    log._on_log(ERROR, b"later\n", None)  # no longer held
    assert capfd.readouterr().err == "a real failure\nlater\n"


def test_debugging_writes_everything_at_once(
    capfd: pytest.CaptureFixture[str], installed: Installer
) -> None:
    log = installed(True)
    with llama_log.held() as kept:
        log._on_log(WARN, b"w\n", None)
        log._on_log(ERROR, b"e\n", None)
        kept.drop()
    assert kept.lines == [] and capfd.readouterr().err == "w\ne\n"
