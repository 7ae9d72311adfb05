"""The HTTP server under the fake Weixin: cheroot's threaded WSGI server, keeping connections alive.

werkzeug's development server answers every request with `Connection: close`,
so a client's connection pool could never reuse a connection: each call paid a
TCP connect, a new server thread, an accept and a close on both sides, which
cost more CPU than the call itself. cheroot (CherryPy's server) speaks HTTP/1.1
keep-alive and serves requests from a fixed pool of threads.

The "dropped connection" fault needs the connection itself: each request's WSGI
environ carries a callable under DROP_CONNECTION_KEY that cuts it.
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cheroot import wsgi

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["DROP_CONNECTION_KEY", "ServerThread"]

log = logging.getLogger(__name__)

DROP_CONNECTION_KEY = "fake_weixin.drop_connection"  # environ key: call it to close the connection, no reply

# Defaults, one place.
THREADS = 16  # requests served at once; a latency fault holds a thread while it sleeps
IDLE_TIMEOUT = 30  # seconds a kept-alive connection may stay idle (and a request may take to arrive)
KEEP_ALIVE_LIMIT = 64  # idle kept-alive connections at most; beyond that a reply closes its connection
POLL_INTERVAL = 0.05  # seconds between the accept loop's checks for stop() (stop() waits up to this)
SHUTDOWN_TIMEOUT = 5  # seconds stop() waits for requests in flight


def _drop(request: Any) -> None:
    """Shut the request's connection down both ways and never answer on it."""
    request.close_connection = True
    try:
        request.conn.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


class _Gateway(wsgi.Gateway_10):
    """WSGI 1.0 gateway that also hands the application a way to drop the connection."""

    # cheroot's stub declares the base method as returning None; it returns the environ.
    def get_environ(self) -> dict[str, Any]:  # type: ignore[override]
        environ: dict[str, Any] = super().get_environ()
        environ[DROP_CONNECTION_KEY] = functools.partial(_drop, self.req)
        return environ


class _Server(wsgi.Server):
    """cheroot's WSGI server with its error lines sent to logging instead of stderr."""

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        # cheroot reports clients that went away at INFO; only real errors matter here.
        if level >= logging.WARNING:
            log.log(level, "fake weixin server: %s", msg, exc_info=traceback)


def _logged(app: WSGIApplication) -> WSGIApplication:
    """Log one line per request: method, path and status (no query string: it holds the access_token)."""

    def logged_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def logging_start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], object]:
            log.info("%s %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        return app(environ, logging_start_response)

    return logged_app


class ServerThread:
    """A WSGI app served on (host, port) from daemon threads: `port`, `stop()`."""

    def __init__(self, app: WSGIApplication, host: str, port: int, *, access_log: bool = False) -> None:
        self._server = _Server((host, port), _logged(app) if access_log else app, numthreads=THREADS,
                               timeout=IDLE_TIMEOUT, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self._server.gateway = _Gateway
        self._server.keep_alive_conn_limit = KEEP_ALIVE_LIMIT
        self._server.expiration_interval = POLL_INTERVAL
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        # cheroot's threads inherit this thread's daemon flag: a fake left running
        # never keeps the process from exiting (the old server's threads were daemons too).
        self._thread = threading.Thread(target=self._run, name="fake-weixin", daemon=True)

    def start(self) -> ServerThread:
        """Bind, start serving in the background; raises OSError if the address is taken."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure
        return self

    def _run(self) -> None:
        try:
            self._server.prepare()  # binds and listens; starts the request threads
        except BaseException as exc:  # handed to start(), which raises it
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._server.serve()
        except Exception:
            log.exception("fake weixin server stopped on an error")

    @property
    def port(self) -> int:
        """The port it listens on (the ephemeral one picked when asked for port 0)."""
        return int(self._server.bind_addr[1])

    def stop(self) -> None:
        """Stop accepting, close kept-alive connections, wait for requests in flight."""
        self._server.stop()
        self._thread.join(SHUTDOWN_TIMEOUT)
