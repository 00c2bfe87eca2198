"""systemd notifications (READY, WATCHDOG, STOPPING, STATUS) without a dependency.

Follows systemd's `man/notify-selfcontained-example.py`: one datagram over an AF_UNIX socket
to `$NOTIFY_SOCKET`; a leading '@' names a socket in the abstract namespace. Without
`$NOTIFY_SOCKET` (a terminal, a test, cron) every call is a no-op that returns False.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def _socket_address(raw: str) -> str | bytes | None:
    """Turn $NOTIFY_SOCKET into an address for socket.connect, or None when it is unusable."""
    if raw.startswith("@"):
        # Abstract namespace: the kernel expects a leading NUL byte instead of the '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd also knows vsock:CID:PORT (VMs); the daemon never runs that way, so ignore it.
    return None


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification (e.g. "READY=1") to systemd; False when not under systemd or on failure."""
    raw = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    address = _socket_address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking: a receiver that stops reading (full queue) must cost a lost ping, never a hung daemon.
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        # A lost notification must never take the daemon down; systemd's watchdog is the backstop.
        return False
    return True


def notify_ready() -> bool:
    """Tell systemd the warm-up is done (Type=notify units count as started only now)."""
    return sd_notify("READY=1")


def notify_watchdog() -> bool:
    """Reset systemd's watchdog timer (WatchdogSec=); sent after every tick."""
    return sd_notify("WATCHDOG=1")


def notify_stopping() -> bool:
    """Tell systemd a clean shutdown has begun."""
    return sd_notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """Set the one-line status shown by `systemctl status` (newlines are flattened)."""
    return sd_notify("STATUS=" + " ".join(text.splitlines()))
