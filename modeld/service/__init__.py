"""How modeld lives under a service manager: systemd socket activation, sd_notify, logging."""

from __future__ import annotations
