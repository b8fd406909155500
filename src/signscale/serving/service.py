"""Running the service: a socket bound before the model loads (so a port conflict fails at once),
uvicorn on it, and ``running()`` for tests and benchmarks: a real server on 127.0.0.1 that stops
cleanly when the block ends."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:  # the serve extra; without it create_app() says which extra to install
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]
from signscale.serving.predict import resolve_model
from signscale.serving.reload import ModelSlot, ModelSource
from signscale.serving.serve import AppState, ServeConfig, ServeError, create_app, require_serve_extra


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with ``sock.getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP, and without it every keep-alive response stalls ~40 ms on the client's delayed ACK
    # (uvicorn writes headers and body separately). Accepted sockets inherit NODELAY on Linux too.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"host/port: cannot listen on {host}:{port} ({exc}); pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, cfg: ServeConfig) -> Any:
    try:
        import uvicorn
    except ImportError:
        raise ServeError("serving needs uvicorn: pip install 'signscale[serve]'") from None
    return uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, lifespan="on", access_log=False,
                                         timeout_graceful_shutdown=5, backlog=2048))


@dataclass(frozen=True)
class Service:
    """A service started by :func:`running`: its base URL and its model slot (``poll()`` reloads now)."""

    url: str
    slot: ModelSlot

    def poll(self) -> str:
        return self.slot.poll()


@contextlib.contextmanager
def running(cfg: ServeConfig, *, source: ModelSource | None = None) -> Iterator[Service]:
    """Serve in a background thread of this process; yields the :class:`Service` once the model is ready."""
    sock = bind(cfg.host, cfg.port)
    app = create_app(cfg, source=source)
    server = _uvicorn_server(app, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="signscale-serve", daemon=True)
    thread.start()
    state: AppState = app.app.state.signscale
    try:
        while not state.ready.wait(0.5):  # startup loads and warms the model; a dead thread means it failed
            if not thread.is_alive():
                break
        if state.startup_error is not None or not thread.is_alive():
            raise ServeError(f"the service did not start: {state.startup_error!r}")
        host, port = sock.getsockname()[:2]
        yield Service(url=f"http://{host if ':' not in host else f'[{host}]'}:{port}", slot=state.slot)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def serve_socket(cfg: ServeConfig, sock: socket.socket) -> None:
    """Run the service on an already-bound socket in this process until interrupted."""
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.WARNING))
    _uvicorn_server(create_app(cfg), cfg).run(sockets=[sock])


def serve(cfg: ServeConfig, *, on_listening: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; ``workers`` > 1 runs that many processes on one shared socket."""
    require_serve_extra()
    resolve_model(cfg.model)  # a wrong path or alias: one clear error now, not a traceback from each worker
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{host}:{port}")
    if cfg.workers == 1:
        serve_socket(cfg, sock)
        return
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")  # a fresh interpreter each: no forked torch thread pools
    procs = [ctx.Process(target=serve_socket, args=(cfg, sock), name=f"signscale-serve-{i}")
             for i in range(cfg.workers)]
    for p in procs:
        p.start()

    def stop(signum: int, frame: Any) -> None:  # SIGTERM (a process manager) stops the workers too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
    finally:
        sock.close()
