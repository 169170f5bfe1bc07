"""The MCP app: the tools of tools.py on the official MCP SDK (2.x, ``MCPServer``), over stdio
or streamable HTTP.

One store per process (``govdb.get_db()``), shared by every MCP session.
Who the caller is comes from the ``agent_id`` and ``api_key`` of each call,
checked against the store, never from the transport session, so any number
of server processes, or stateless HTTP, serve the same agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent

from .. import close_db, get_db
from .. import validate as v
from ..config import Settings
from ..errors import ConfigError, GovdbError, NotFoundError, StoreUnavailableError, ValidationError
from . import tools

log = logging.getLogger("govdb.server")

INSTRUCTIONS = """Governance store for agents. Start with register_agent (keep the api_key it returns:
it is shown once), then bind_session and check_in your EISV state. Tools that change your data
take your agent_id and api_key. Knowledge: store_discovery, search_discoveries, get_neighbors,
get_response_chain. Review: open_dialectic, join_dialectic, submit_thesis / antithesis /
synthesis, resolve_dialectic."""


def error_result(error_type: str, message: str, **details: Any) -> CallToolResult:
    """Return a tool error the model can read: the message, and its type and details as data."""
    return CallToolResult(
        content=[TextContent(type="text", text=f"{error_type}: {message}")],
        structured_content={"error": {"type": error_type, "message": message, **details}},
        is_error=True,
    )


def _govdb_error(exc: GovdbError) -> CallToolResult:
    if isinstance(exc, ValidationError):
        return error_result("ValidationError", str(exc), field=exc.field)
    if isinstance(exc, NotFoundError):
        return error_result("NotFoundError", str(exc), kind=exc.kind, key=str(exc.key))
    if isinstance(exc, StoreUnavailableError):
        return error_result("StoreUnavailableError", f"the store is unavailable, try again later ({exc})")
    return error_result(type(exc).__name__, str(exc))


def _tool(impl: Callable[..., Any], settings: Settings) -> Callable[..., Any]:
    """Wrap a tools.py function as an MCP tool: the store is injected, errors become results."""
    sig = inspect.signature(impl, eval_str=True)
    name = impl.__name__
    reports_down_store = impl is tools.health  # health answers "not ok" rather than failing

    async def tool(**kwargs: Any) -> Any:
        info = tools.current_call.get()
        try:
            db = get_db(settings)
            try:
                await db.connect()  # a no-op once connected; retried while the store is down
            except StoreUnavailableError:
                if not reports_down_store:
                    raise
            return await impl(db, **kwargs)
        except GovdbError as exc:
            result = _govdb_error(exc)
        except Exception:  # noqa: BLE001 - a bug must not reach the client as a traceback
            log.exception("tool %s failed unexpectedly", name)
            result = error_result("InternalError", f"{name} failed unexpectedly; the server log has the details")
        if info is not None:
            info.error_type = result.structured_content["error"]["type"]
        return result

    tool.__name__ = name
    tool.__doc__ = impl.__doc__
    tool.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    return tool


class ToolUsageRecorder:
    """Server middleware: record every tools/call in tool usage (tool, agent, latency, outcome).

    It sits outside argument validation, so calls the SDK refuses (unknown
    tool, arguments not matching the schema) are recorded too. It names a
    missing argument, and refuses one the tool does not have (which the SDK
    would silently drop).
    """

    def __init__(self, settings: Settings, arguments: dict[str, frozenset[str]],
                 required: dict[str, tuple[str, ...]]):
        self.settings = settings
        self.arguments = arguments
        self.required = required

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        if ctx.method != "tools/call" or not isinstance(ctx.params, Mapping):
            return await call_next(ctx)
        name = ctx.params.get("name")
        args = ctx.params.get("arguments")
        args = args if isinstance(args, dict) else {}
        info = tools.CallInfo()
        token = tools.current_call.set(info)
        start = time.perf_counter()
        try:
            result = self._check_names(name, args)
            if result is None:
                result = await call_next(ctx)
            else:
                info.error_type = "ValidationError"
        except Exception as exc:
            await self._record(name, args, info, start, type(exc).__name__)
            raise
        finally:
            tools.current_call.reset(token)
        failed = result.get("isError") if isinstance(result, dict) else getattr(result, "is_error", False)
        if failed and info.error_type is None:
            info.error_type = "ArgumentError" if name in self.arguments else "UnknownTool"
            if isinstance(result, dict) and not result.get("structuredContent"):
                # The SDK refused the call: give its message the same shape as ours.
                text = " ".join(c.get("text", "") for c in result.get("content", []) if isinstance(c, dict))
                result["structuredContent"] = {"error": {"type": info.error_type, "message": text}}
        await self._record(name, args, info, start, info.error_type if failed else None)
        return result

    def _check_names(self, name: Any, args: dict[str, Any]) -> CallToolResult | None:
        if name not in self.arguments:
            return None  # the SDK answers an unknown tool
        missing = [a for a in self.required[name] if a not in args]
        if missing:
            return error_result("ValidationError", f"{missing[0]} is required by {name}", field=missing[0])
        extra = sorted(set(args) - self.arguments[name])
        if extra:
            return error_result("ValidationError", f"{extra[0]} is not an argument of {name} "
                                f"(expected: {', '.join(sorted(self.arguments[name]))})", field=extra[0])
        return None

    async def _record(self, name: Any, args: dict[str, Any], info: tools.CallInfo, start: float,
                      error_type: str | None) -> None:
        latency = round((time.perf_counter() - start) * 1000)
        try:
            tool_name = v.ident("tool_name", name)
            agent = info.agent_id or _ident_or_none(args.get("agent_id"))
            db = get_db(self.settings)
            await db.connect()
            await db.record_tool_usage(tool_name, agent_id=agent, session_id=info.session_id,
                                       latency_ms=latency, success=error_type is None,
                                       error_type=error_type, payload={"pid": os.getpid()})
        except GovdbError as exc:
            log.warning("tool usage of %r not recorded (%s)", name if isinstance(name, str) else "?",
                        type(exc).__name__)


def _ident_or_none(value: Any) -> str | None:
    try:
        return v.opt_ident("agent_id", value)
    except ValidationError:
        return None


def build_server(settings: Settings) -> MCPServer:
    """Return the MCP server with every governance tool."""
    params = {impl.__name__: list(inspect.signature(impl).parameters.values())[1:] for impl in tools.TOOLS}
    arguments = {name: frozenset(p.name for p in ps) for name, ps in params.items()}
    required = {name: tuple(p.name for p in ps if p.default is inspect.Parameter.empty)
                for name, ps in params.items()}
    server: MCPServer = MCPServer(
        "govdb", title="govdb governance store", version=_version(), instructions=INSTRUCTIONS,
        log_level="WARNING", middleware=[ToolUsageRecorder(settings, arguments, required)])
    for impl in tools.TOOLS:
        server.add_tool(_tool(impl, settings), name=impl.__name__, structured_output=True)
    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("govdb")
    except PackageNotFoundError:
        return "0"


def parse_http(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``PORT``; host 127.0.0.1; IPv6 as ``[::1]:PORT``)."""
    host, sep, port = value.strip().rpartition(":")
    host = (host if sep else "").strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError("--http", f"must be HOST:PORT or PORT; got {value!r}") from None
    if not 0 < number < 65536:
        raise ConfigError("--http", f"has port {number} outside 1-65535")
    return host, number


def configure_logging() -> None:
    """Send every log line to stderr: over stdio, stdout carries only protocol messages."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("govdb").setLevel(logging.INFO)


def serve(settings: Settings, http: str | None = None, *, stateless: bool = False) -> int:
    """Serve the governance tools over stdio, or over streamable HTTP at ``http`` (HOST:PORT)."""
    configure_logging()
    address = parse_http(http) if http is not None else None
    try:
        asyncio.run(_serve(settings, address, stateless))
    except SystemExit as exc:
        if exc.code in (0, None) or address is None:
            raise
        # uvicorn exits 3 when it cannot bind; the cause is already on stderr.
        raise ConfigError("--http", f"cannot serve on {http} (see the message above)") from None
    return 0


async def _serve(settings: Settings, address: tuple[str, int] | None, stateless: bool) -> None:
    server = build_server(settings)
    db = get_db(settings)
    where = settings.postgres_url.masked if settings.backend != "sqlite" else str(settings.sqlite_path)
    try:
        await db.connect()
        log.info("store ready: %s (%s)", settings.backend, where)
    except GovdbError as exc:
        log.warning("store not available yet (%s); tools report it until it answers", exc)
    try:
        if address is None:
            await server.run_stdio_async()
            return
        host, port = address
        app = server.streamable_http_app(host=host, stateless_http=stateless)
        log.info("serving MCP on http://%s:%d/mcp%s", host, port, " (stateless)" if stateless else "")
        await _http_server(app, host, port).serve()
    finally:
        await close_db()


def _http_server(app: Any, host: str, port: int) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would end
            # the process before the store is closed: stop the same way, then return.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
