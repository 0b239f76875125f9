"""Routing and the one place where errors become HTTP responses.

`App.__call__` is the handler the HTTP server calls for every request: it checks the
Host header on loopback TCP, finds the route, runs it, and turns a `ModeldError` raised
before the response started into `{"error": {"code", "message"}}` (OpenAI's error object
under /v1/) with its status.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from modeld.api.infer import handle_infer
from modeld.errors import Forbidden, MethodNotAllowed, ModeldError, NotFound
from modeld.http.protocol import Request
from modeld.http.server import ClientGone, ConnInfo, Responder, log_request
from modeld.manager.manager import Manager
from modeld.manager.states import State
from modeld.registry import Registry

log = logging.getLogger("modeld.http")

Route = Callable[[Request, Responder], Awaitable[None]]
# Endpoints that write their own, richer request log line (model, timings, outcome).
SELF_LOGGING = frozenset({"/infer", "/v1/completions", "/v1/chat/completions"})
# Health probes are polled often: logged at debug level only.
PROBES = frozenset({"/healthz", "/readyz"})
OPENAI_PREFIX = "/v1/"  # errors of these routes (and of unknown paths below) use OpenAI's shape
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass
class AppState:
    registry: Registry
    manager: Manager
    default_model: str | None = None


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def error_body(path: str, error: ModeldError) -> dict[str, Any]:
    """The error object for a request to `path`: OpenAI's shape under /v1/, else modeld's."""
    return error.to_openai() if path.startswith(OPENAI_PREFIX) else error.to_json()


def is_loopback_host(host: str) -> bool:
    """True when a Host header names this machine (a loopback name or address), with an
    optional port of digits; anything else after the name (`[::1]evil.com`) is refused."""
    host = host.strip().lower()
    if host.startswith("["):
        name, closed, rest = host[1:].partition("]")
        if not closed:
            return False
    elif host.count(":") > 1:  # a bare IPv6 address (no port possible)
        name, rest = host, ""
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and (rest[1:] == "" or rest[1:].isdecimal())):
        return False  # an optional port: ASCII digits or nothing (RFC 3986 allows `host:`)
    name = name.removesuffix(".")  # a fully qualified name may end in a dot
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name.partition("%")[0])  # drop a v6 scope id
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


class App:
    """modeld's HTTP API."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.prefix_routes: dict[str, dict[str, Route]] = {}  # "/v1/models/" -> ...
        self.routes: dict[str, dict[str, Route]] = {
            "/healthz": {"GET": self.healthz},
            "/readyz": {"GET": self.readyz},
            "/models": {"GET": self.models},
            "/status": {"GET": self.status},
            "/infer": {"POST": self.infer},
        }

    def add_routes(self, routes: dict[str, dict[str, Route]]) -> None:
        """Add routes; a path ending in `/*` matches every longer path under it."""
        for path, methods in routes.items():
            if path.endswith("/*"):
                self.prefix_routes.setdefault(path[:-1], {}).update(methods)
            else:
                self.routes.setdefault(path, {}).update(methods)

    async def __call__(self, request: Request, res: Responder, info: ConnInfo) -> None:
        route: Route | None = None
        outcome: str | None = None  # the error code answered, if any
        try:
            host = request.authority if request.authority is not None else request.header("host")
            if info.loopback_only and not is_loopback_host(host or ""):
                raise Forbidden("the Host header must name a loopback address on this listener")
            route = self._route(request)
            await route(request, res)
        except ModeldError as exc:
            outcome = exc.code
            if not res.started:
                await res.respond_error(exc, error_body(request.path, exc))
            else:
                log.warning("error after the response started: %s", exc.message)
        except (ClientGone, anyio.get_cancelled_exc_class()):
            raise
        except Exception:
            outcome = ModeldError.code
            log.exception("unhandled error serving %s %s", request.method, request.path)
            if not res.started:
                error = ModeldError("internal error; see the daemon's log")
                await res.respond_error(error, error_body(request.path, error))
        finally:
            # A generating route logs its own line, once it has been reached: a refusal
            # before it (403, 405) is logged here like any other response.
            if route is None or request.path not in SELF_LOGGING:
                log_request(
                    request.method,
                    request.path,
                    res.status or 499,
                    request.received_at,
                    outcome=outcome,
                    level=logging.DEBUG if request.path in PROBES else logging.INFO,
                )

    def _route(self, request: Request) -> Route:
        methods = self.routes.get(request.path)
        if methods is None:
            methods = next(
                (
                    m
                    for prefix, m in self.prefix_routes.items()
                    if request.path.startswith(prefix) and len(request.path) > len(prefix)
                ),
                None,
            )
        if methods is None:
            raise NotFound(f"no such endpoint: {request.path}")
        route = methods.get(request.method)
        if route is None and request.method == "HEAD":
            route = methods.get("GET")  # the same answer; the connection sends no body
        if route is None:
            allow = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            raise MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}", allow=allow
            )
        return route

    async def _json(self, res: Responder, status: int, obj: Any) -> None:
        await res.respond(status, [("Content-Type", "application/json")], json_bytes(obj))

    async def healthz(self, request: Request, res: Responder) -> None:
        await self._json(res, 200, {"status": "ok"})

    async def readyz(self, request: Request, res: Responder) -> None:
        manager, default = self.state.manager, self.state.default_model
        if default is not None:
            spec = self.state.registry.lookup(default)
            ready = spec is not None and manager.is_ready(spec.id)
        else:
            ready = manager.is_ready()
        await self._json(res, 200 if ready else 503, {"ready": ready})

    async def models(self, request: Request, res: Responder) -> None:
        registry, manager = self.state.registry, self.state.manager
        await registry.refresh()
        out = []
        for spec in registry.models():
            inst = manager.instances.get(spec.id)
            entry = spec.public()
            if inst is not None and inst.spec == spec:
                entry["state"] = str(inst.state)
                entry["vram_mb"] = inst.vram_mb
                if inst.vram_mb is not None:  # once loaded, the figure the budget counts
                    entry["est_vram_mb"] = inst.vram_mb
                entry["error"] = inst.error if inst.state is State.ERROR else None
            else:
                entry["state"] = str(State.ERROR if spec.invalid else State.UNLOADED)
                entry["vram_mb"] = None
                entry["error"] = spec.invalid
            out.append(entry)
        await self._json(res, 200, {"models": out})

    async def status(self, request: Request, res: Responder) -> None:
        await self._json(res, 200, self.state.manager.status())

    async def infer(self, request: Request, res: Responder) -> None:
        await handle_infer(
            request, res, self.state.registry, self.state.manager, self.state.default_model
        )
