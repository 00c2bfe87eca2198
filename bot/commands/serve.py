"""`ritmo serve`: the dashboard, JSON API and control commands over the daemon's state (docs/design.md §13).

A separate process from the daemon: it reads the state databases through read-only connections (WAL: it never
holds a tick up) and writes nothing but rows of the `commands` table, which the daemon applies at its next tick.
It binds RITMO_SERVE_HOST:RITMO_SERVE_PORT (127.0.0.1:8080); a bind beyond loopback needs RITMO_API_TOKEN
(ConfigError, exit 78). uvicorn serves the Starlette app; SIGTERM or Ctrl-C stops it gracefully with exit 0.
Under systemd (`systemd/ritmo-serve.service`, Type=notify) READY=1 is sent once the socket listens.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import signal
from pathlib import Path
from typing import Any

import structlog

from bot.errors import ConfigError, RitmoError
from bot.logs import configure_logging
from bot.notify import notify_ready, notify_stopping
from bot.settings import Settings, load_settings

# The CLI must not set up stderr logging for us: a service logs to stdout (journald), like `ritmo run`.
CONFIGURES_LOGGING = True

log = structlog.get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ritmo serve`."""
    p.add_argument(
        "--state-dir",
        type=Path,
        action="append",
        default=None,
        help="serve every *.sqlite in DIR and its subdirectories (repeatable; default RITMO_STATE_DIR)",
    )
    p.add_argument(
        "--state", type=Path, action="append", default=None, metavar="FILE", help="serve this state file (repeatable)"
    )
    p.add_argument("--host", default=None, help="address to bind (default RITMO_SERVE_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default RITMO_SERVE_PORT, 8080)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="Host header names answered on a non-loopback bind (repeatable; default any)",
    )
    p.add_argument("--env-file", default=".env", help="settings file (default .env; the environment wins)")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, port: int, api_token: str) -> None:
    """Refuse a bind beyond loopback without a token (ConfigError, exit 78)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 1 to 65535")
    if not is_loopback(host) and not api_token:
        raise ConfigError(
            f"refusing to serve on {host}:{port} without RITMO_API_TOKEN: a bind beyond loopback needs a token "
            "(or bind 127.0.0.1 and reach it through an SSH tunnel or a reverse proxy)"
        )


def main(args: argparse.Namespace) -> int:
    """Run `ritmo serve` until SIGTERM or Ctrl-C."""
    settings = load_settings(env_file=args.env_file)
    changes: dict[str, Any] = {}
    if args.host is not None:
        changes["serve_host"] = args.host
    if args.port is not None:
        changes["serve_port"] = args.port
    settings = dataclasses.replace(settings, **changes) if changes else settings
    check_bind(settings.serve_host, settings.serve_port, settings.api_token)
    configure_logging(settings.log_format, settings.log_level, secrets=settings.secret_values())

    # Imported here: `ritmo --help` and the CLI's parser never load Starlette.
    from bot.web.app import LOOPBACK_HOSTS, create_app
    from bot.web.queries import StateCatalog

    dirs = list(args.state_dir or [])
    files = list(args.state or [])
    if not dirs and not files:
        dirs = [settings.state_dir]
    for d in dirs:
        if not d.is_dir():
            log.warning("serve_state_dir_missing", path=str(d))
    allowed = list(LOOPBACK_HOSTS) if is_loopback(settings.serve_host) else args.allowed_host
    app = create_app(
        StateCatalog(dirs, files),
        api_token=settings.api_token,
        secrets=settings.secret_values(),
        allowed_hosts=allowed,
    )
    return run_server(app, settings, [str(d) for d in dirs] + [str(f) for f in files])


def run_server(app: Any, settings: Settings, sources: list[str]) -> int:
    """Serve `app` with uvicorn until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    import uvicorn

    host, port = settings.serve_host, settings.serve_port
    if not is_loopback(host):
        # The bearer token would cross the network in clear text without TLS in front.
        log.warning("serve_beyond_loopback", host=host, port=port, advice="put a TLS reverse proxy in front")
    # uvicorn's own lines go through our renderer (log_config=None). Its access log would add a line per
    # dashboard refresh and its start-up chatter repeats `serve_started`: warnings and errors only (a failed
    # bind among them); commands are logged by the app (`command_queued`).
    if settings.log_level != "DEBUG":
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.WARNING)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                notify_ready()
                log.info(
                    "serve_started",
                    url=f"http://{host if ':' not in host else f'[{host}]'}:{port}/",
                    states=sources,
                    control_enabled=bool(settings.api_token),
                )

        async def shutdown(self, sockets: Any = None) -> None:
            notify_stopping()
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler turns that into a
    # normal return (exit 0, a clean stop for systemd) instead of death by SIGTERM or a KeyboardInterrupt.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:
        # uvicorn exits 3 when it cannot bind (address in use, no permission), after logging why.
        raise RitmoError(f"cannot listen on {host}:{port} (the log line above says why)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("serve_stopped")
    return 0
