"""A TCP proxy on loopback between a client and a real server, for tests of broken connections: ``cut()`` closes
every connection it carries (the client's streams fail UNAVAILABLE, the next call connects again), ``refuse(n)``
closes the next ``n`` connections as soon as they are accepted (before a byte reaches the server)."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host.strip("[]"), int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._refuse = 0
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse(self, connections: int = 1) -> None:
        with self._lock:
            self._refuse = connections

    def cut(self) -> None:
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                refused = self._refuse > 0
                self._refuse -= refused
            if refused:
                _close(client)
                continue
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        with contextlib.suppress(OSError):  # a side cut or closed: the other is closed too
            while data := source.recv(65536):
                sink.sendall(data)
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed or never connected
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
