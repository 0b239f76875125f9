"""Filesystem locations shared by the daemon and `modelctl`, so both agree on them."""

from __future__ import annotations

import warnings
from pathlib import Path

import platformdirs

APP_NAME = "modeld"  # the platformdirs app name: the runtime dir is $XDG_RUNTIME_DIR/modeld
SOCKET_NAME = "modeld.sock"  # the Unix socket's file name inside the runtime dir


def default_socket_path() -> Path:
    """The Unix socket the daemon listens on and the CLI connects to when none is given."""
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR platformdirs falls back to /tmp/runtime-$UID and warns on
        # every call; both sides fall back the same way, so the warning is only noise.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP_NAME)) / SOCKET_NAME
