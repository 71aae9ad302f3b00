"""A TCP proxy on loopback whose link can be cut: a network blip between workers and PostgreSQL,
without touching the server other tests use. While cut, existing connections are dropped and new
ones are accepted and closed at once, as a flapping network or a restarting server would do.

`lose_commit_reply(statement)` arms a nastier fault, once: on the first connection that sends
`statement`, the next COMMIT reaches the server, which commits, and the connection drops before
the reply comes back, so the client cannot tell whether its transaction landed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FlakyProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._armed: bytes | None = None  # statement whose transaction's reply is to be lost
        self.lost = threading.Event()  # set once a reply was lost
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def lose_commit_reply(self, statement: bytes) -> None:
        self.lost.clear()
        self._armed = statement

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            replies = threading.Event()  # cleared: the server's bytes are dropped, not relayed
            replies.set()
            threading.Thread(target=self._requests, args=(client, server, replies),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, replies),
                             daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, replies: threading.Event) -> None:
        """Client to server, watching for the armed statement and then its COMMIT (psycopg2
        sends each statement as one simple-query message, so each arrives whole)."""
        marked = False
        try:
            while chunk := src.recv(65536):
                armed = self._armed
                if armed is not None and armed in chunk:
                    marked = True
                if marked and b"COMMIT" in chunk and self._armed is not None:
                    self._armed = None
                    replies.clear()
                    dst.sendall(chunk)
                    # Set before either side can hang up: the reply pipe does when the reply
                    # (now dropped) comes, and the client then sees the connection fail.
                    self.lost.set()
                    # Let the server read and run the COMMIT before the connection goes.
                    time.sleep(0.3)
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            self._hang_up(src, dst)

    @classmethod
    def _pipe(cls, src: socket.socket, dst: socket.socket, relay: threading.Event) -> None:
        try:
            while (chunk := src.recv(65536)) and relay.is_set():
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            cls._hang_up(src, dst)

    @staticmethod
    def _hang_up(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
