"""The daemon's listening sockets: opening them (or adopting systemd's), closing them.

Owns the Unix socket file (a stale one is replaced, a live daemon's is never touched, and
ours is removed at exit), the warnings for listeners anyone may reach, and the open-files
limit the connection cap must fit under.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from modeld.api.app import is_loopback_host
from modeld.config import Config
from modeld.http.server import ConnInfo
from modeld.http.tcp import TCPListener
from modeld.service import systemd

log = logging.getLogger("modeld")

# Descriptors kept out of the connection cap (at most half the limit): listeners, each
# worker's three pipes, log files, the models dir scan.
FD_RESERVE = 256
# accept() errors that mean the listening socket itself is unusable; any other (out of
# descriptors or memory for a moment, a client gone during the handshake, ...) passes.
FATAL_ACCEPT_ERRORS = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
ACCEPT_RETRY_S = 0.1  # wait after a failed accept() before the next
ACCEPT_LOG_S = 1.0  # failed accepts are logged at most this often


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass
class OpenListener:
    listener: anyio.abc.SocketListener
    info: ConnInfo
    label: str
    unlink: Path | None = None  # our own Unix socket file, removed at exit
    inode: int = 0  # of that file, so a successor's socket is never removed


async def open_listeners(cfg: Config) -> list[OpenListener]:
    inherited = systemd.listen_fds()
    if inherited:
        return [await _adopt(inh) for inh in inherited]
    out: list[OpenListener] = []
    try:
        if cfg.socket_path is not None:
            out.append(await _open_unix(cfg.socket_path, cfg.socket_mode))
        if cfg.listen is not None:
            out.extend(await _open_tcp(*cfg.listen))
    except BaseException:
        # A start that fails half-way leaves nothing behind: no socket file, no listener.
        await close_listeners(out)
        raise
    if not out:
        raise StartupError("no listener: give --socket and/or --listen")
    return out


async def close_listeners(listeners: list[OpenListener]) -> None:
    """Close listeners and remove our socket files; safe to call more than once."""
    with anyio.CancelScope(shield=True):
        for item in listeners:
            try:
                await item.listener.aclose()
            except OSError:
                pass
            _remove_socket_file(item)


def warn_if_exposed(cfg: Config, listeners: list[OpenListener]) -> None:
    """modeld has no authentication: say so loudly when others can reach it."""
    for item in listeners:
        if item.info.kind == "tcp" and not item.info.loopback_only:
            log.warning(
                "%s is reachable from other machines, without authentication (and without "
                "the Host check of loopback listeners): anyone who can connect can load "
                "models and run generations; firewall it or put an authenticating proxy in "
                "front, or listen on 127.0.0.1",
                item.label,
                extra={"fields": {"event": "exposed", "listener": item.label}},
            )
    own_socket = any(item.unlink is not None for item in listeners)
    if own_socket and cfg.socket_path is not None and cfg.socket_mode & 0o002:
        log.warning(
            "--socket-mode %04o lets every local user connect to %s, without authentication; "
            "use 0600, or 0660 and a group",
            cfg.socket_mode,
            cfg.socket_path,
            extra={"fields": {"event": "exposed", "listener": f"unix:{cfg.socket_path}"}},
        )


async def _adopt(inh: systemd.InheritedSocket) -> OpenListener:
    """A listener systemd opened for us (socket activation)."""
    sock = inh.sock
    sock.setblocking(False)
    if inh.family == socket.AF_UNIX:
        return OpenListener(
            await anyio.abc.SocketListener.from_socket(sock),
            ConnInfo("unix", False),
            f"unix:{sock.getsockname()} (systemd)",
        )
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        raise StartupError(
            f"systemd passed a socket that is not a listening stream socket ({inh.name});"
            " use ListenStream= without Accept=yes"
        )
    host, port = sock.getsockname()[:2]
    return OpenListener(
        TCPListener(sock),
        ConnInfo("tcp", is_loopback_host(str(host))),
        f"{_tcp_label(str(host), port)} (systemd)",
    )


def _tcp_label(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


async def _open_tcp(host: str, port: int) -> list[OpenListener]:
    try:
        multi = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # anyio opens the sockets (addresses, dual stack, options); modeld.http.tcp serves them.
    out: list[OpenListener] = []
    try:
        for sub in multi.listeners:
            assert isinstance(sub, anyio.abc.SocketListener)
            addr = sub.extra(anyio.abc.SocketAttribute.local_address)
            assert isinstance(addr, tuple)
            bound, bound_port = addr[:2]
            listener = TCPListener(sub.extra(anyio.abc.SocketAttribute.raw_socket).dup())
            info = ConnInfo("tcp", is_loopback_host(str(bound)))
            out.append(OpenListener(listener, info, _tcp_label(str(bound), int(bound_port))))
    except BaseException:
        for item in out:
            await item.listener.aclose()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await multi.aclose()
    return out


async def _open_unix(path: Path, mode: int) -> OpenListener:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if _daemon_alive(path):
            raise StartupError(
                f"another modeld is already serving on {path}; stop it first "
                "(or give this one another --socket)"
            )
        if not path.is_socket():
            raise StartupError(
                f"{path} exists and is not a socket; remove it or choose another --socket"
            )
        path.unlink()  # a stale socket left by a daemon that died
    try:
        listener = await anyio.create_unix_listener(path, mode=mode)
    except OSError as exc:
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return OpenListener(
        listener, ConnInfo("unix", False), f"unix:{path}", unlink=path, inode=path.stat().st_ino
    )


def _daemon_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        probe.close()


def _remove_socket_file(item: OpenListener) -> None:
    if item.unlink is None:
        return
    try:
        if item.unlink.stat().st_ino == item.inode:
            item.unlink.unlink()
    except OSError:
        pass
    item.unlink = None


def fit_connections_to_fd_limit(max_connections: int) -> int:
    """Raise the soft open-files limit to the hard one and return a connection cap under it.

    A service often starts with a soft limit of 1024, no more than the default cap: the
    accept() past it would fail with EMFILE instead of the 503 the cap promises.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max_connections + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    except (ValueError, OSError) as exc:
        log.debug("cannot raise the open-files limit: %s", exc)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    room = max(1, soft - min(FD_RESERVE, soft // 2))
    if max_connections <= room:
        return max_connections
    log.warning(
        "--max-connections %d does not fit under the open-files limit %d: "
        "connections past %d get 503 (raise LimitNOFILE or ulimit -n)",
        max_connections,
        soft,
        room,
    )
    return room


def transient_accept_error(exc: BaseException) -> bool:
    """True when an accept() failure passes: wait a moment and accept again."""
    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
    return isinstance(cause, OSError) and cause.errno not in FATAL_ACCEPT_ERRORS


async def accept_forever(
    item: OpenListener, stopping: anyio.Event
) -> AsyncIterator[anyio.abc.SocketStream]:
    """The connections of one listener, until it is closed (or breaks for good).

    anyio's Unix listener wraps every accept() error in BrokenResourceError, so an EMFILE
    there must not be taken for a closed listener: transient errors wait a moment and
    accept again, logged once a second at most with a count of the others.
    """
    failures, logged_at = 0, -ACCEPT_LOG_S
    while True:
        try:
            stream = await item.listener.accept()
        except anyio.ClosedResourceError:
            return
        except (anyio.BrokenResourceError, OSError) as exc:
            reason = exc.__cause__ or exc
            if stopping.is_set():
                return
            if not transient_accept_error(exc):
                log.error("stopped accepting on %s: %s", item.label, reason)
                return
            failures += 1
            if anyio.current_time() - logged_at >= ACCEPT_LOG_S:
                log.warning("accept failed on %s (%d times): %s", item.label, failures, reason)
                failures, logged_at = 0, anyio.current_time()
            await anyio.sleep(ACCEPT_RETRY_S)
            continue
        yield stream
