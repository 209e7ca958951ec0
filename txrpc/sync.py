"""The blocking API (the seed's example): ``Client`` and ``Server`` without async.

    from txrpc.sync import Server
    server = Server()                  # 127.0.0.1:12345
    server.add = lambda a, b: a + b    # any attribute set to a callable becomes a method
    server.start()                     # serves until stopped (start(background=True) returns)

    from txrpc.sync import Client
    client = Client("localhost", 12345)
    print(client.add(1, 2))            # 3

Both run a trio event loop on a private thread; calls are thread-safe. Handlers are
plain functions run on that loop one at a time, like ``xmlrpc.server``: a handler
that blocks delays the others (use the async API for concurrent handlers).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import trio

from ._client import Client as AsyncClient
from ._client import connect
from ._errors import Unavailable
from ._limits import Limits
from ._server import Server as AsyncServer
from ._service import Service

START_TIMEOUT_S = 30.0


class _LoopThread:
    """A trio loop on a daemon thread running ``body(ready)`` until ``stop()``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, body: Callable[[trio.Nursery], Awaitable[None]], wait: bool = True) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    await body(nursery)
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                self._error = exc
            finally:
                self._ready.set()

        def run() -> None:
            trio.run(main)

        if not wait:
            run()
            return
        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"{self._name} did not start within {START_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise RuntimeError(f"{self._name} is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=START_TIMEOUT_S)


class Client:
    """A blocking client: ``Client(host, port).add(1, 2)``. Thread-safe; close() or use ``with``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 12345,
        *,
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._timeout = timeout
        self._client: AsyncClient | None = None
        self._loop = _LoopThread(f"txrpc-client-{host}:{port}")

        async def body(nursery: trio.Nursery) -> None:
            client = connect(host, port, limits=limits)
            self._client = await nursery_enter(nursery, client)

        self._loop.start(body)

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` and block until its result (raises ``txrpc.RpcError`` subclasses)."""
        client = self._client
        if client is None:
            raise Unavailable("client is closed", {"not_started": True})
        target = client.options(timeout=self._timeout) if self._timeout is not None else client
        try:
            return self._loop.run(functools.partial(target.call, method, *args, **kwargs))
        except trio.RunFinishedError:
            raise Unavailable("client is closed", {"not_started": True}) from None

    def __getattr__(self, name: str) -> _SyncMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _SyncMethod(self, name)

    def close(self) -> None:
        self._client = None
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _SyncMethod:
    __slots__ = ("_client", "_name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    def __getattr__(self, name: str) -> _SyncMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _SyncMethod(self._client, f"{self._name}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.call(self._name, *args, **kwargs)


async def nursery_enter(nursery: trio.Nursery, client: AsyncClient) -> AsyncClient:
    """Enter ``client`` and keep it open until ``nursery`` is cancelled."""

    async def hold(task_status: trio.TaskStatus[AsyncClient] = trio.TASK_STATUS_IGNORED) -> None:
        async with client:
            task_status.started(client)
            await trio.sleep_forever()

    result: AsyncClient = await nursery.start(hold)
    return result


class Server:
    """A blocking server: set callables as attributes (``server.add = lambda a, b: a + b``)
    or use ``@server.method``; then ``server.start()``.

    ``start()`` serves until ``stop()`` (from another thread) or Ctrl-C;
    ``start(background=True)`` returns once listening and serves on a thread.
    """

    _own = frozenset({"host", "port", "limits"})
    host: str
    port: int
    limits: Limits | None
    _service: Service
    _server: AsyncServer | None
    _loop: _LoopThread

    def __init__(self, host: str = "127.0.0.1", port: int = 12345, *, limits: Limits | None = None) -> None:
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "limits", limits)
        object.__setattr__(self, "_service", Service())
        object.__setattr__(self, "_server", None)
        object.__setattr__(self, "_loop", _LoopThread(f"txrpc-server-{host}:{port}"))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in self._own or not callable(value):
            object.__setattr__(self, name, value)
        else:
            self.method(value, name=name)

    def method(self, fn: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
        """Register ``fn`` as a method (under ``name``, default its ``__name__``)."""
        self._service.add_method(fn, name=name)
        return fn

    def start(self, background: bool = False) -> None:
        async def body(nursery: trio.Nursery) -> None:
            server = AsyncServer(self._service, limits=self.limits)
            await nursery.start(server.serve_tcp, self.host, self.port)
            object.__setattr__(self, "_server", server)
            if self.port == 0:
                object.__setattr__(self, "port", server.port)

        if background:
            self._loop.start(body)
        else:
            try:
                self._loop.start(body, wait=False)
            except KeyboardInterrupt:
                pass

    def stop(self, grace_s: float | None = None) -> None:
        """Stop serving: in-flight calls get up to ``grace_s`` to finish."""
        server = self._server
        if server is not None:
            try:
                self._loop.run(functools.partial(server.shutdown, grace_s))
            except trio.RunFinishedError:
                pass
        self._loop.stop()


__all__ = ["Client", "Server"]
