"""The autouse fixture really blocks outbound sockets (and allows loopback)."""

from __future__ import annotations

import socket

import pytest


@pytest.mark.parametrize("family, address", [(socket.AF_INET, ("93.184.216.34", 80)),
                                             (socket.AF_INET6, ("2606:2800:220:1::1", 80, 0, 0))])
def test_outbound_tcp_blocked(family: int, address: tuple) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError, match="network access blocked"):
            s.connect(address)
        with pytest.raises(OSError, match="network access blocked"):
            s.connect_ex(address)


def test_outbound_udp_blocked() -> None:
    """A DNS-style datagram to an outside resolver is refused before it leaves."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError, match="network access blocked"):
            s.sendto(b"\x00", ("8.8.8.8", 53))
        with pytest.raises(OSError, match="network access blocked"):
            s.sendto(b"\x00", 0, ("8.8.8.8", 53))


def test_loopback_carries_data() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname(), timeout=5) as c:
            peer, _ = srv.accept()
            with peer:
                c.sendall(b"ping")
                assert peer.recv(4) == b"ping"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        assert tx.sendto(b"pong", rx.getsockname()) == 4
        assert rx.recv(4) == b"pong"
