"""The h11 client against the fake daemon: transports, streaming, errors, timeouts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from modelctl.client import (
    Client,
    DaemonError,
    DaemonTimeout,
    Endpoint,
    ProtocolError,
    Unreachable,
)
from tests.unit.modelctl.fakes import (
    FakeDaemon,
    Reply,
    error_reply,
    json_reply,
)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://127.0.0.1:8484", "127.0.0.1", 8484),
        ("http://localhost:9000/", "localhost", 9000),
        ("http://localhost", "localhost", 80),
        ("http://[::1]:8484", "::1", 8484),
    ],
)
def test_endpoint_from_url(url: str, host: str, port: int) -> None:
    endpoint = Endpoint.from_url(url)
    assert (endpoint.host, endpoint.port, endpoint.is_unix) == (host, port, False)


def test_endpoint_host_header_and_description() -> None:
    assert Endpoint.from_url("http://[::1]:8484").host_header() == "[::1]:8484"
    assert Endpoint.from_url("http://127.0.0.1:1").describe() == "http://127.0.0.1:1"
    unix = Endpoint.unix("/run/x.sock")
    assert (unix.host_header(), unix.describe()) == ("localhost", "unix socket /run/x.sock")


@pytest.mark.parametrize(
    "url", ["https://localhost:1", "localhost:8484", "http://:80", "http://h:1/v1", "http://h:x"]
)
def test_endpoint_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.from_url(url)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_get_json_over_both_transports(fake: FakeDaemon, transport: str) -> None:
    fake.route("GET", "/healthz", json_reply({"status": "ok"}))
    endpoint = (
        Endpoint.unix(fake.socket_path) if transport == "unix" else Endpoint.from_url(fake.url)
    )
    assert Client(endpoint).get_json("/healthz") == {"status": "ok"}
    seen = fake.requests[0]
    assert seen.headers["host"] == endpoint.host_header()
    assert seen.headers["user-agent"].startswith("modelctl/")


def test_post_sends_json_body(fake: FakeDaemon) -> None:
    fake.route("POST", "/infer", json_reply({"text": "x"}))
    client = Client(Endpoint.unix(fake.socket_path))
    with client.request("POST", "/infer", json_body={"prompt": "héllo"}) as response:
        assert response.status == 200
        assert response.json() == {"text": "x"}
    assert fake.requests[0].json() == {"prompt": "héllo"}
    assert fake.requests[0].headers["content-type"] == "application/json"


def test_iter_lines_joins_lines_split_across_chunks(fake: FakeDaemon) -> None:
    chunks = [b'{"a":', b'1}\n{"b"', b":2}\n\n", '{"c":"é'.encode()[:-1], 'é"}'.encode()[1:]]
    fake.route("GET", "/s", Reply(chunks=chunks))
    with Client(Endpoint.unix(fake.socket_path)).request("GET", "/s") as response:
        lines = list(response.iter_lines())
    assert lines == [b'{"a":1}', b'{"b":2}', '{"c":"é"}'.encode()]


def test_error_answer_becomes_daemon_error(fake: FakeDaemon) -> None:
    fake.route("GET", "/models", error_reply(404, "model_not_found", "no model 'x'", param="model"))
    with pytest.raises(DaemonError) as caught:
        Client(Endpoint.unix(fake.socket_path)).get_json("/models")
    error = caught.value
    assert (error.status, error.code, error.message, error.param) == (
        404,
        "model_not_found",
        "no model 'x'",
        "model",
    )


def test_retry_after_header_wins_over_body_hint(fake: FakeDaemon) -> None:
    fake.route("GET", "/x", error_reply(429, "queue_full", "full", retry_after_ms=2500))
    with pytest.raises(DaemonError) as caught:
        Client(Endpoint.unix(fake.socket_path)).get_json("/x")
    assert caught.value.retry_after_s == 2.0  # header: whole seconds
    assert caught.value.code == "queue_full"


def test_non_json_error_body_still_becomes_daemon_error(fake: FakeDaemon) -> None:
    fake.route("GET", "/x", Reply(status=502, body=b"bad gateway"))
    with pytest.raises(DaemonError) as caught:
        Client(Endpoint.unix(fake.socket_path)).get_json("/x")
    assert caught.value.code == "http_502"
    assert "bad gateway" in caught.value.message


def test_missing_socket_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(Unreachable) as caught:
        Client(Endpoint.unix(tmp_path / "none.sock")).get_json("/healthz")
    assert str(tmp_path / "none.sock") in str(caught.value)


def test_stale_socket_file_is_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()  # the file stays, nothing listens
    with pytest.raises(Unreachable, match="refused"):
        Client(Endpoint.unix(path)).get_json("/healthz")


def test_closed_port_is_unreachable() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(Unreachable, match=f"http://127.0.0.1:{port}"):
        Client(Endpoint.from_url(f"http://127.0.0.1:{port}")).get_json("/healthz")


def test_slow_answer_times_out(fake: FakeDaemon) -> None:
    fake.route("GET", "/slow", Reply(body=b"{}", delay_s=0.5))
    with pytest.raises(DaemonTimeout):
        Client(Endpoint.unix(fake.socket_path), read_timeout=0.1).get_json("/slow")


def test_stream_cut_short_is_a_protocol_error(fake: FakeDaemon) -> None:
    fake.route("GET", "/s", Reply(chunks=[b'{"type":"token","text":"a"}\n'], close_early=True))
    with (
        Client(Endpoint.unix(fake.socket_path)).request("GET", "/s") as response,
        pytest.raises(ProtocolError),
    ):
        list(response.iter_lines())


def test_non_json_answer_is_a_protocol_error(fake: FakeDaemon) -> None:
    fake.route("GET", "/x", Reply(body=b"<html>"))
    with pytest.raises(ProtocolError):
        Client(Endpoint.unix(fake.socket_path)).get_json("/x")
