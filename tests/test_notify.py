"""sd_notify over a real AF_UNIX datagram socket, file-system and abstract addresses."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot import notify


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, announced as $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_messages_arrive(receiver: socket.socket) -> None:
    assert notify.notify_ready()
    assert receiver.recv(4096) == b"READY=1"
    assert notify.notify_watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    assert notify.notify_status("tick 2024-12-01T00:05Z\nequity 10000")
    assert receiver.recv(4096) == b"STATUS=tick 2024-12-01T00:05Z equity 10000"
    assert notify.notify_stopping()
    assert receiver.recv(4096) == b"STOPPING=1"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ritmo-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.sd_notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify_ready() is False
    assert notify.sd_notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    assert notify.sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    assert notify.sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_a_receiver_that_stops_reading_never_blocks_the_sender(tmp_path) -> None:
    """Past the kernel's datagram queue limit, sd_notify returns False instead of hanging the daemon."""
    import socket as _socket

    from bot.notify import sd_notify

    path = tmp_path / "notify.sock"
    receiver = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        results = [sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": str(path)}) for _ in range(200)]
    finally:
        receiver.close()
    assert results[0] is True
    assert results[-1] is False, "the queue should have filled and the send failed without blocking"
