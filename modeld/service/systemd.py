"""systemd integration without libsystemd: socket activation, sd_notify and the watchdog.

The protocols are small and stable (see sd_listen_fds(3), sd_notify(3)):

- socket activation hands listening sockets over as fds 3.. with `LISTEN_PID`,
  `LISTEN_FDS` and `LISTEN_FDNAMES` in the environment;
- readiness, status and watchdog pings are `KEY=VALUE` lines sent as one datagram to the
  AF_UNIX socket named by `$NOTIFY_SOCKET`;
- `WATCHDOG_USEC` (and `WATCHDOG_PID`) say how often the manager wants a ping.

Every function here is a no-op outside systemd, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # the first inherited fd; fixed by the socket-activation protocol
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")  # what activation puts in env
UNKNOWN_FD_NAME = "unknown"  # the name systemd itself uses when none was given
NOTIFY_SEND_TIMEOUT_S = 0.5  # a full notify queue must not stall the event loop for long
WATCHDOG_PING_FRACTION = 0.5  # ping twice per WatchdogSec, as sd_watchdog_enabled(3) advises


@dataclass(frozen=True)
class InheritedSocket:
    """One listening socket handed over by the service manager."""

    sock: socket.socket
    name: str  # FileDescriptorName= of the .socket unit, or "unknown"
    family: int  # socket.AF_UNIX, AF_INET or AF_INET6: how the daemon tells listeners apart


def listen_fds(unset_env: bool = True) -> list[InheritedSocket]:
    """Adopt the sockets passed by systemd socket activation; [] when not activated.

    With `unset_env` the activation variables leave os.environ whatever the outcome, so
    worker processes never believe the sockets are theirs (as sd_listen_fds(3) does).
    """
    try:
        count = _activated_fd_count()
        if count == 0:
            return []
        names = _fd_names(count)
        adopted = []
        for index in range(count):
            inherited = _adopt(SD_LISTEN_FDS_START + index, names[index])
            if inherited is not None:
                adopted.append(inherited)
        return adopted
    finally:
        if unset_env:
            for key in LISTEN_ENV:
                os.environ.pop(key, None)


def _activated_fd_count() -> int:
    """How many fds systemd passed to this very process (0 when none or not for us)."""
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    if pid_text is None or count_text is None:
        return 0
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        logger.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid_text, count_text)
        return 0
    if pid != os.getpid():
        logger.debug("LISTEN_PID=%d is not this process (%d): not activated", pid, os.getpid())
        return 0
    if count < 0:
        logger.warning("ignoring negative LISTEN_FDS=%d", count)
        return 0
    return count


def _fd_names(count: int) -> list[str]:
    """The names from LISTEN_FDNAMES, padded with "unknown" to `count` entries."""
    raw = os.environ.get("LISTEN_FDNAMES")
    names = raw.split(":") if raw else []
    if raw is not None and len(names) != count:
        logger.warning("LISTEN_FDNAMES has %d names for %d fds", len(names), count)
    names = [name or UNKNOWN_FD_NAME for name in names[:count]]
    return names + [UNKNOWN_FD_NAME] * (count - len(names))


def _adopt(fd: int, name: str) -> InheritedSocket | None:
    """Wrap one inherited fd in a socket object; None (and a warning) if it is no socket."""
    try:
        sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
    except OSError as exc:
        logger.warning("inherited fd %d (%s) is not a socket, skipping it: %s", fd, name, exc)
        return None
    # Never leak the listener into worker processes; the server decides on non-blocking
    # mode itself when it wraps the socket, so start from the plain blocking state.
    sock.set_inheritable(False)
    sock.setblocking(True)
    return InheritedSocket(sock=sock, name=name, family=int(sock.family))


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not under systemd or when sending failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    elif not address.startswith("/"):
        logger.debug("unsupported NOTIFY_SOCKET=%r; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        logger.debug("sd_notify %r to %r failed: %s", message, address, exc)
        return False
    return True


def _one_line(text: str) -> str:
    """A status text fit for one `KEY=VALUE` line."""
    return " ".join(text.splitlines())


def notify_ready(status: str) -> bool:
    """Tell the manager startup is done (Type=notify units leave 'activating' now)."""
    return notify(f"READY=1\nSTATUS={_one_line(status)}")


def notify_status(status: str) -> bool:
    """Update the one-line status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(status)}")


def notify_stopping() -> bool:
    """Tell the manager a clean shutdown has begun."""
    return notify("STOPPING=1")


def notify_watchdog() -> bool:
    """Ping the watchdog: the event loop is alive."""
    return notify("WATCHDOG=1")


def notify_extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start/stop timeout fires (e.g. while preloading)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")


def watchdog_interval_s() -> float | None:
    """How often to call notify_watchdog(): half of WatchdogSec, or None when it is off."""
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None  # the watchdog is meant for another process (e.g. our parent)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec_text, pid_text)
        return None
    if usec <= 0:
        return None
    return usec * WATCHDOG_PING_FRACTION / 1_000_000
