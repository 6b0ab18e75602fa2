"""A raw HTTP/1.1 server on loopback, for tests that need exact bytes on the wire.

aiohttp.web would normalise whatever we send; attacks on the client's reading of answers need
lying Content-Length, endless chunking, smuggled extra answers, echoing proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs


@attrs.define
class Seen:
    """What the raw server received: request lines and Authorization headers, in order."""

    lines: list[str] = attrs.field(factory=list)
    auth: list[str] = attrs.field(factory=list)

    def count(self, method: str) -> int:
        return sum(1 for line in self.lines if line.startswith(method + " "))


Answer = Callable[[str, str, asyncio.StreamWriter], Awaitable[bool]]


@contextlib.asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[tuple[str, Seen]]:
    """Serve ``answer(method, target, writer) -> keep_alive`` for every request; yields the
    base URL and what was seen. Every connection task ends with the block."""
    seen = Seen()
    tasks: set[asyncio.Task[Any]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            for _ in range(1000):  # bounded: one connection, at most this many requests
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                seen.lines.append(lines[0])
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    elif name.lower() == "authorization":
                        seen.auth.append(value.strip())
                if length:
                    await reader.readexactly(length)
                method, target, _ = lines[0].split(" ", 2)
                keep = await answer(method, target, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def fixed(answer: bytes) -> Answer:
    """Every request gets the same raw bytes; the connection stays open."""

    async def write(method: str, target: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        return True

    return write
