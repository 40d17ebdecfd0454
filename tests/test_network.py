"""The autouse fixture really blocks outbound sockets (and allows loopback)."""

from __future__ import annotations

import socket

import pytest


def test_outbound_blocked() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError, match="network access blocked"):
        s.connect(("93.184.216.34", 80))
    s.close()


def test_loopback_allowed() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.connect(srv.getsockname())
    c.close()
    srv.close()
