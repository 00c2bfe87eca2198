"""The Starlette application of `ritmo serve`: JSON API, dashboard pages and control commands (docs/design.md §13).

Starlette rather than a larger framework: routing, static files and a test client are all `ritmo serve` needs,
it has few dependencies and a long record; uvicorn (`bot/commands/serve.py`) runs it.

Routes (every API answer is JSON; errors are `{"error": "..."}` with 400, 401, 403, 404 or 503):
  GET  /                          the list of states (dashboard)
  GET  /s/{id}                    the dashboard of one state
  GET  /api/states                the states served, each with a short summary
  GET  /api/{id}/status           exactly what `ritmo status --json` prints
  GET  /api/{id}/trades           fills             paged, range on the decision candle
  GET  /api/{id}/orders           orders            paged, range on the decision candle, ?status=
  GET  /api/{id}/decisions        one row per tick  paged, range on the candle, ?status=, ?decided=1
  GET  /api/{id}/equity           equity and buy-and-hold per tick, range, ?max_points=
  GET  /api/{id}/learning         online updates by k, rhythm, rollbacks; paged by k
  GET  /api/{id}/events           events            paged, range on at_ms, ?kind=
  GET  /api/{id}/commands         control commands  paged, range on requested_at_ms, ?status=
  POST /api/{id}/commands         {"kind": "pause"|"resume"|"flatten"|"clear_halt"}, bearer token -> 202
Paging: `limit` (default 100, at most 1000), `before_id` / `after_id` (keyset on the list's `id`), `order`
(desc, the default, or asc); each answer carries `next` (the cursor of the following page, or null). Time
ranges: `from` (inclusive) and `to` (exclusive), an ISO date or date-time (UTC unless it says otherwise) or
epoch milliseconds.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot.daemon.report import finite
from bot.daemon.state import COMMAND_KINDS
from bot.web import queries
from bot.web.queries import MAX_LIMIT, ApiError, Page, StateCatalog
from strategies.candles import parse_utc_date_ms

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = {
    # Only our own script, style and fetches; the charts are SVG drawn by that script, no inline code at all.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
# Host names a loopback-bound server answers to: anything else is a DNS-rebinding page in the operator's browser.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
MAX_POINTS_LIMIT = 20_000
DEFAULT_MAX_POINTS = 1_000
_PAGE_PARAMS = {"limit", "before_id", "after_id", "from", "to", "order"}
_MAX_BODY_BYTES = 1024
# Below this length a "secret" (an Apprise host name, a short option) would mask innocent text and numbers.
_MIN_MASKED_SECRET_LEN = 8
_PRINTABLE = re.compile(r"[^\x20-\x7e]")

Handler = Callable[[Request], Awaitable[Response]]


class Params:
    """The query parameters of one request, validated: an unknown, repeated or malformed one is a 400."""

    def __init__(self, request: Request, allowed: set[str]) -> None:
        q = request.query_params
        unknown = sorted(set(q.keys()) - allowed)
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}: expected {', '.join(sorted(allowed)) or 'none'}")
        for key in q:
            if len(q.getlist(key)) > 1:
                raise ApiError(400, f"parameter {key!r} given more than once")
        self.q = q

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        """An integer in [lo, hi]."""
        raw = self.q.get(name)
        if raw is None or raw == "":
            return default
        if not re.fullmatch(r"-?\d{1,19}", raw):
            raise ApiError(400, f"{name}={raw!r}: expected an integer")
        value = int(raw)
        if not lo <= value <= hi:
            raise ApiError(400, f"{name}={raw}: expected {lo} to {hi}")
        return value

    def time_ms(self, name: str) -> int | None:
        """An ISO date / date-time (UTC unless it has an offset) or epoch milliseconds."""
        raw = self.q.get(name)
        if raw is None or raw == "":
            return None
        if re.fullmatch(r"\d{1,15}", raw):
            return int(raw)
        try:
            return parse_utc_date_ms(raw)
        except ValueError:
            raise ApiError(
                400, f"{name}={raw!r}: expected an ISO date or date-time (2024-11-01, 2024-11-01T12:00Z) or UTC ms"
            ) from None

    def choices(self, name: str, allowed: Sequence[str]) -> tuple[str, ...]:
        """A comma-separated list of values out of `allowed`."""
        raw = self.q.get(name)
        if not raw:
            return ()
        values = tuple(v.strip() for v in raw.split(",") if v.strip())
        for v in values:
            if v not in allowed:
                raise ApiError(400, f"{name}={v!r}: expected one of {', '.join(allowed)}")
        return values

    def words(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of identifiers (event kinds)."""
        raw = self.q.get(name)
        if not raw:
            return ()
        values = tuple(v.strip() for v in raw.split(",") if v.strip())
        for v in values:
            if not re.fullmatch(r"[a-z0-9_]{1,64}", v):
                raise ApiError(400, f"{name}={v!r}: expected snake_case names separated by commas")
        return values

    def flag(self, name: str) -> bool:
        """A boolean: 1/true/yes or 0/false/no."""
        raw = (self.q.get(name) or "").lower()
        if raw in ("", "0", "false", "no"):
            return False
        if raw in ("1", "true", "yes"):
            return True
        raise ApiError(400, f"{name}={raw!r}: expected 1 or 0")

    def time_range(self) -> tuple[int | None, int | None]:
        """`from` and `to`, with from < to."""
        from_ms, to_ms = self.time_ms("from"), self.time_ms("to")
        if from_ms is not None and to_ms is not None and from_ms >= to_ms:
            raise ApiError(400, "from must be before to (to is exclusive)")
        return from_ms, to_ms

    def page(self) -> Page:
        """The paging parameters every list shares."""
        order = self.q.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order={order!r}: expected asc or desc")
        from_ms, to_ms = self.time_range()
        return Page(
            limit=self.integer("limit", queries.DEFAULT_LIMIT, 1, MAX_LIMIT) or queries.DEFAULT_LIMIT,
            before_id=self.integer("before_id", None, -(2**63), 2**63 - 1),
            after_id=self.integer("after_id", None, -(2**63), 2**63 - 1),
            from_ms=from_ms,
            to_ms=to_ms,
            descending=order == "desc",
        )


class _Guard:
    """ASGI middleware: security headers on every answer; a Host header check against DNS rebinding."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        if self.allowed_hosts is not None:
            host = _host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                response = json_response({"error": "unexpected Host header (serve binds loopback: use 127.0.0.1)"}, 400)
                await response(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)


def _host_name(header: str) -> str:
    """The host part of a Host header, lower case ("[::1]:8080" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def json_response(content: Any, status_code: int = 200, secrets: Sequence[str] = ()) -> Response:
    """A JSON answer: non-finite floats as null (as `ritmo status --json`), never caching, secrets masked."""
    body = json.dumps(finite(content), default=str, allow_nan=False, separators=(",", ":"))
    for secret in secrets:
        if secret in body:
            # The state never holds a secret; if one got in anyway, it still never leaves this process.
            log.error("secret_masked_in_response", status_code=status_code)
            body = body.replace(secret, "***")
    return Response(body, status_code, media_type="application/json", headers={"cache-control": "no-store"})


def create_app(
    catalog: StateCatalog,
    *,
    api_token: str = "",
    secrets: Sequence[str] = (),
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The ASGI app over the states of `catalog`; control commands need `api_token` (empty = refused).

    `secrets` (the settings' secret values) are masked in any answer that would contain one; `allowed_hosts`
    (None = any) are the Host names answered, the rest get 400.
    """
    # Longest first, so that a secret containing another is masked whole.
    masked = sorted({s for s in (*secrets, api_token) if len(s) >= _MIN_MASKED_SECRET_LEN}, key=len, reverse=True)

    def respond(content: Any, status_code: int = 200) -> Response:
        return json_response(content, status_code, masked)

    def endpoint(fn: Callable[[Request], Awaitable[Any]], status_code: int = 200) -> Handler:
        """Wrap a handler: its value as JSON, ApiError as its status, anything else as a logged 500."""

        async def handle(request: Request) -> Response:
            try:
                return respond(await fn(request), status_code)
            except ApiError as exc:
                return respond({"error": exc.message}, exc.status_code)
            except Exception as exc:
                log.error("api_failed", path=request.url.path, error=type(exc).__name__, exc_info=True)
                return respond({"error": "internal error (logged by ritmo serve)"}, 500)

        return handle

    def target(request: Request, allowed: set[str]) -> tuple[queries.StateRef, Params]:
        """The state of the URL (404 first) and the validated query parameters (then 400)."""
        return catalog.get(request.path_params["state_id"]), Params(request, allowed)

    def snapshot(ref: queries.StateRef, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        """`fn(store, *args)` on one read-only snapshot, in a worker thread (SQLite calls block)."""

        def work() -> Any:
            with queries.read_snapshot(ref.path) as store:
                return fn(store, *args)

        return run_in_threadpool(work)

    async def states(request: Request) -> Any:
        Params(request, set())

        def work() -> list[dict[str, Any]]:
            out = []
            for ref in catalog.refs():
                entry: dict[str, Any] = {"id": ref.id, "path": str(ref.path), "available": True, "error": None}
                try:
                    with queries.read_snapshot(ref.path) as store:
                        entry["summary"] = queries.state_summary(store)
                except ApiError as exc:
                    entry.update(available=False, error=exc.message, summary=None)
                out.append(entry)
            return out

        return {"states": await run_in_threadpool(work), "control_enabled": bool(api_token)}

    async def status(request: Request) -> Any:
        ref, _ = target(request, set())
        return await snapshot(ref, queries.status)

    async def trades(request: Request) -> Any:
        ref, p = target(request, _PAGE_PARAMS)
        return await snapshot(ref, queries.trades, p.page())

    async def orders(request: Request) -> Any:
        ref, p = target(request, _PAGE_PARAMS | {"status"})
        statuses = p.choices("status", ("intent", "sent", "filled", "rejected", "unknown"))
        return await snapshot(ref, queries.orders, p.page(), statuses)

    async def decisions(request: Request) -> Any:
        ref, p = target(request, _PAGE_PARAMS | {"status", "decided"})
        statuses = p.choices("status", ("acted", "rejected", "halted", "skipped", "kept"))
        return await snapshot(ref, queries.decisions, p.page(), statuses, p.flag("decided"))

    async def equity(request: Request) -> Any:
        ref, p = target(request, {"from", "to", "max_points"})
        from_ms, to_ms = p.time_range()
        max_points = p.integer("max_points", DEFAULT_MAX_POINTS, 2, MAX_POINTS_LIMIT) or DEFAULT_MAX_POINTS
        return await snapshot(ref, queries.equity_curve, from_ms, to_ms, max_points)

    async def learning(request: Request) -> Any:
        ref, p = target(request, _PAGE_PARAMS | {"status"})
        statuses = p.choices("status", ("learned", "rejected", "rolled_back"))
        return await snapshot(ref, queries.learning, p.page(), statuses)

    async def events(request: Request) -> Any:
        ref, p = target(request, _PAGE_PARAMS | {"kind"})
        return await snapshot(ref, queries.events, p.page(), p.words("kind"))

    async def commands(request: Request) -> Any:
        ref, p = target(request, _PAGE_PARAMS | {"status"})
        statuses = p.choices("status", ("pending", "applied", "rejected"))
        return await snapshot(ref, queries.commands, p.page(), statuses)

    async def post_command(request: Request) -> Any:
        ref = catalog.get(request.path_params["state_id"])
        Params(request, set())
        client = request.client.host if request.client else "unknown"
        if not api_token:
            log.warning("command_refused", state=ref.id, client=client, reason="no_token_configured")
            raise ApiError(403, "control actions are disabled: set RITMO_API_TOKEN")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_token.encode()):
            log.warning("command_refused", state=ref.id, client=client, reason="bad_token")
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <RITMO_API_TOKEN>)")
        body = await request.body()
        if len(body) > _MAX_BODY_BYTES:
            raise ApiError(400, "request body too large")
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            raise ApiError(400, 'body: expected JSON such as {"kind": "pause"}') from None
        kind = payload.get("kind") if isinstance(payload, dict) else None
        if not isinstance(kind, str) or kind not in COMMAND_KINDS:
            raise ApiError(400, f"kind: expected one of {', '.join(COMMAND_KINDS)}")
        requested_by = _requester(request, client)
        row = await run_in_threadpool(queries.queue_command, ref.path, kind, requested_by)
        log.info("command_queued", state=ref.id, command_id=row["id"], kind=kind, requested_by=requested_by)
        return row

    async def page(request: Request) -> Response:
        if "state_id" in request.path_params:
            try:
                catalog.get(request.path_params["state_id"])
            except ApiError as exc:
                return respond({"error": exc.message}, exc.status_code)
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return respond({"error": exc.detail}, exc.status_code)

    routes = [
        Route("/", page),
        Route("/s/{state_id}", page),
        Route("/api/states", endpoint(states)),
        Route("/api/{state_id}/status", endpoint(status)),
        Route("/api/{state_id}/trades", endpoint(trades)),
        Route("/api/{state_id}/orders", endpoint(orders)),
        Route("/api/{state_id}/decisions", endpoint(decisions)),
        Route("/api/{state_id}/equity", endpoint(equity)),
        Route("/api/{state_id}/learning", endpoint(learning)),
        Route("/api/{state_id}/events", endpoint(events)),
        Route("/api/{state_id}/commands", endpoint(commands), methods=["GET"]),
        Route("/api/{state_id}/commands", endpoint(post_command, 202), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    return app


def _requester(request: Request, client: str) -> str:
    """Who asked, for the audit trail: `api:<client address>` and the X-Ritmo-User header or the user agent."""
    who = request.headers.get("x-ritmo-user") or request.headers.get("user-agent") or ""
    who = _PRINTABLE.sub("", who).strip()[:64]
    return f"api:{client}" + (f" ({who})" if who else "")
