"""Settings from `.env` and the environment (docs/design.md §11): typed, validated once at start.

Every setting is `RITMO_<NAME>`. Sources, highest precedence first:
  1. the process environment (systemd's `EnvironmentFile=` and `Environment=` land here);
  2. the `.env` file, read with python-dotenv's `dotenv_values` (never copied into `os.environ`);
  3. the defaults below (the same values `.env.example` lists).
API_KEY / API_SECRET may also come from systemd credentials (`LoadCredential=ritmo_api_key:...`),
read from `$CREDENTIALS_DIRECTORY`. An empty value means "use the default" (or "unset" for the
optional settings). Relative paths are relative to the working directory.

Any bad value raises `ConfigError` (exit code 78) with one line naming the setting, what is wrong and
what is accepted. Secret values never appear in an error message or a repr.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dotenv import dotenv_values

from bot.errors import ConfigError
from strategies.actions import POSITION_MODES

ENV_PREFIX = "RITMO_"
# Live mode refuses to start unless RITMO_LIVE_CONFIRM holds exactly this phrase (see .env.example).
LIVE_CONFIRM_PHRASE = "I understand this trades real money"

MODES = ("paper", "live", "replay")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# systemd credential names (LoadCredential=NAME:PATH) for the secret settings.
CREDENTIAL_NAMES = {"api_key": "ritmo_api_key", "api_secret": "ritmo_api_secret"}
# Fields whose values are masked in redacted() and handed to the log redactor.
SECRET_FIELDS = frozenset({*CREDENTIAL_NAMES, "api_token", "notify_urls"})
# Keys inside RITMO_EXCHANGE_CONFIG whose values are masked in redacted() and fed to the log redactor.
_SECRET_KEY_RE = re.compile(r"key|secret|password|token|uid|privatekey|passphrase", re.IGNORECASE)
# user:password@ inside a proxy URL.
_URL_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")
_SYMBOL_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_SYMBOL_RE = re.compile(rf"^{_SYMBOL_PART}/{_SYMBOL_PART}(:{_SYMBOL_PART})?$")
_EXCHANGE_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MIN_SECRET_LEN = 8
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
# A candle closes every 300 s: a tick starting after the next close would act on a stale candle.
_CANDLE_S = 300


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, repr=False)
class Settings:
    """Every RITMO_* setting, parsed and validated; build it with load_settings()."""

    mode: str = "paper"
    """paper (real market data, local ledger), live (real orders) or replay (data file, simulated clock)."""
    live_confirm: str = ""
    """Must equal LIVE_CONFIRM_PHRASE for live mode to start."""
    exchange: str = "binance"
    """ccxt exchange id."""
    exchange_config: Mapping[str, Any] = field(default_factory=_empty_mapping)
    """JSON object merged into the ccxt constructor arguments (URLs, proxies, options); read-only."""
    sandbox: bool = False
    """Use the exchange's test network / demo trading where ccxt supports it."""
    symbol: str = "BTC/USDT"
    """ccxt unified symbol, BASE/QUOTE (futures: BASE/QUOTE:SETTLE)."""
    position_mode: str = ""
    """long_only or long_short; empty = take it from the checkpoint (the daemon refuses a mismatch)."""
    api_key: str = ""
    """Exchange API key (secret: masked in repr and logs)."""
    api_secret: str = ""
    """Exchange API secret (secret: masked in repr and logs)."""
    checkpoint: Path = Path("checkpoints/default.pt")
    """Checkpoint to start from when the state holds no newer online version."""
    state_dir: Path = Path("state")
    """Directory of the SQLite state and online checkpoints (one database per mode and symbol)."""
    paper_balance: float = 10_000.0
    """Starting quote balance of the paper ledger."""
    commission: float = 0.001
    """Fee per side as a fraction of the traded notional."""
    slippage_bps: float = 0.0
    """Simulated slippage in basis points, moving paper fills against us."""
    max_position_quote: float | None = None
    """Cap on the position's notional in quote; None = no cap (paper only: live requires one)."""
    max_drawdown: float = 0.5
    """Drawdown from peak equity (fraction) that latches a halt until `ritmo resume`."""
    online_learning: bool = True
    """Learn from closed episodes while trading; false freezes the model."""
    episode_steps: int = 288
    """Decisions per online episode (288 = one day at the card's decision every 5-minute candle; a checkpoint
    deciding every K candles makes an episode K times longer in time)."""
    min_episode_steps: int = 48
    """Minimum steps of an episode truncated by downtime for it to be learned from."""
    macro_every: int = 11
    """Update the macro network once every this many updates (the 1:10 rhythm)."""
    keep_checkpoints: int = 5
    """Online checkpoint versions kept on disk."""
    guard_min_entropy: float = 0.05
    """Learning guard: an online update that takes the policy's mean entropy (nats) under this is rolled back."""
    guard_min_trade_prob: float = 0.001
    """Learning guard: ... or its largest probability of changing the position under this (0 turns a floor off)."""
    seed: int = 0
    """Seed of the decision sampler and the learner."""
    tick_delay_s: int = 5
    """Seconds after each 5-minute close at which the tick runs (lets the exchange publish the candle)."""
    misfire_grace_s: int = 120
    """APScheduler misfire grace time: a tick starting later than this is skipped."""
    log_format: str = "auto"
    """auto (JSON unless stdout is a TTY), json or console."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR (the ccxt logger never goes below INFO)."""
    notify_urls: tuple[str, ...] = ()
    """Apprise URLs notifications are sent to (Telegram, Discord, Slack, ntfy, mailto, json://...); secret."""
    api_token: str = ""
    """Bearer token of `ritmo serve`'s control actions (secret); empty = control actions refused."""
    serve_host: str = "127.0.0.1"
    """Address `ritmo serve` binds; a non-loopback address needs RITMO_API_TOKEN."""
    serve_port: int = 8080
    """TCP port of `ritmo serve`."""

    def redacted(self) -> dict[str, Any]:
        """JSON-able view of the settings with secrets masked, for `ritmo status` and logs."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "***" if value else ""
            elif f.name == "exchange_config":
                value = _redact_config(value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    def secret_values(self) -> tuple[str, ...]:
        """Every secret string these settings hold, for the log redaction processor."""
        values = [
            self.api_key,
            self.api_secret,
            self.api_token,
            *_config_secrets(self.exchange_config),
            *(part for url in self.notify_urls for part in notify_url_secrets(url)),
        ]
        # Short strings under secret-looking config keys are options, not credentials; masking them
        # everywhere would mangle unrelated log text.
        return tuple(dict.fromkeys(v for v in values if len(v) >= _MIN_SECRET_LEN))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({body})"

    __str__ = __repr__


def _redact_config(value: Any, key: str = "") -> Any:
    """Copy of an EXCHANGE_CONFIG value with secret-looking entries and URL passwords masked."""
    if isinstance(value, Mapping):
        return {k: _redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_config(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY_RE.search(key):
            return "***"
        return _URL_USERINFO_RE.sub(r"\1***@", value)
    return value


def _config_secrets(value: Any, key: str = "") -> list[str]:
    """Secret strings inside EXCHANGE_CONFIG: values under secret-looking keys and URL user info."""
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in _config_secrets(v, str(k))]
    if isinstance(value, list):
        return [s for v in value for s in _config_secrets(v, key)]
    if isinstance(value, str):
        if _SECRET_KEY_RE.search(key):
            return [value]
        return [m.group(0)[3:-1] for m in _URL_USERINFO_RE.finditer(value)]
    return []


# ---------------------------------------------------------------------------------------------------
# Parsers: (setting name, raw string) -> typed value, or ConfigError with one actionable line.
# ---------------------------------------------------------------------------------------------------


def _show(raw: str) -> str:
    """The raw value quoted for an error message, shortened so one line stays one line."""
    return repr(raw if len(raw) <= 80 else raw[:77] + "...")


def _invalid(name: str, raw: str, expected: str) -> ConfigError:
    return ConfigError(f"{name}={_show(raw)} is invalid: expected {expected}")


def _parse_choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str, str], str]:
    """Parser for one of a few words, matched case-insensitively."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in choices:
            raise _invalid(name, raw, "one of " + ", ".join(choices))
        return value

    return parse


def _parse_optional_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    """Like _parse_choice, but an empty value is allowed and kept as ''."""
    parse_choice = _parse_choice(choices)

    def parse(name: str, raw: str) -> str:
        if not raw.strip():
            return ""
        try:
            return parse_choice(name, raw)
        except ConfigError:
            raise _invalid(name, raw, "one of " + ", ".join(choices) + " (or empty)") from None

    return parse


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _invalid(name, raw, "true/false (also 1/0, yes/no)")


def _parse_int(lo: int | None = None, hi: int | None = None) -> Callable[[str, str], int]:
    """Parser for an integer in [lo, hi]."""
    if lo is not None and hi is not None:
        accepted = f"an integer from {lo} to {hi}"
    elif lo is not None:
        accepted = f"an integer >= {lo}"
    else:
        accepted = "an integer"

    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise _invalid(name, raw, accepted) from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _invalid(name, raw, accepted)
        return value

    return parse


def _parse_float(
    lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str, str], float]:
    """Parser for a finite number in an interval; open ends exclude the bound."""
    left = f"{'>' if lo_open else '>='} {lo:g}"
    if hi is None:
        accepted = f"a number {left}"
    else:
        accepted = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise _invalid(name, raw, accepted) from None
        too_low = value <= lo if lo_open else value < lo
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or too_low or too_high:
            raise _invalid(name, raw, accepted)
        return value

    return parse


def _parse_optional_positive(name: str, raw: str) -> float | None:
    if not raw.strip():
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise _invalid(name, raw, "a number > 0 in the quote currency, or empty for no cap")
    return value


def _parse_text(name: str, raw: str) -> str:
    return raw.strip()


def _parse_path(name: str, raw: str) -> Path:
    value = raw.strip()
    if "\0" in value:
        raise _invalid(name, raw, "a file system path")
    return Path(value)


def _parse_secret(name: str, raw: str) -> str:
    value = raw.strip()
    # A key never holds whitespace; one that does was pasted wrong. Never echo the value.
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(
            f"{name} is invalid (value not shown): it contains whitespace or control characters; "
            "paste the key exactly as the exchange shows it"
        )
    return value


def _parse_notify_urls(name: str, raw: str) -> tuple[str, ...]:
    urls = tuple(u for u in re.split(r"[\s,]+", raw.strip()) if u)
    for i, url in enumerate(urls, 1):
        if not re.match(r"^[a-z][a-z0-9+.-]*://\S+$", url, re.IGNORECASE):
            # Never echo the value: a notification URL carries a bot token or a password.
            raise ConfigError(
                f"{name} is invalid (value not shown): URL {i} of {len(urls)} is not an Apprise URL such as "
                "tgram://BOT_TOKEN/CHAT_ID, ntfy://TOPIC or json://host/path"
            )
    return urls


def _parse_host(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^[A-Za-z0-9.:_-]+$", value):
        raise _invalid(name, raw, "a host name or IP address such as 127.0.0.1, ::1 or 0.0.0.0")
    return value


def notify_url_secrets(url: str) -> list[str]:
    """The parts of an Apprise URL that may be credentials (the whole URL, its user info, host and path parts)."""
    _, _, rest = url.partition("://")
    parts = [url, rest]
    rest = rest.split("?", 1)[0]
    userinfo, _, hostpath = rest.rpartition("@")
    parts += re.split(r"[:@]", userinfo) if userinfo else []
    parts += [p for p in hostpath.split("/") if p]
    # Query values (?token=..., ?pass=...) as well.
    parts += [v for _, _, v in (q.partition("=") for q in url.partition("?")[2].split("&")) if v]
    return [p for p in parts if len(p) >= _MIN_SECRET_LEN]


def _parse_symbol(name: str, raw: str) -> str:
    value = raw.strip()
    if not _SYMBOL_RE.match(value):
        raise _invalid(name, raw, "a ccxt symbol BASE/QUOTE such as BTC/USDT (futures: BTC/USDT:USDT)")
    return value


def _known_exchange_ids() -> frozenset[str] | None:
    """ccxt's exchange ids from its package files, without importing ccxt (only bot/exchange/client.py may)."""
    try:
        spec = importlib.util.find_spec("ccxt")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ids = frozenset(p.stem for p in package_dir.glob("*.py") if not p.stem.startswith("_"))
    return ids or None


def _parse_exchange(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if not _EXCHANGE_ID_RE.match(value):
        raise _invalid(name, raw, "a ccxt exchange id such as binance or binanceusdm")
    known = _known_exchange_ids()
    if known is not None and value not in known:
        hint = difflib.get_close_matches(value, sorted(known), n=1)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        raise _invalid(name, raw, f"an exchange id that ccxt knows{suggestion or ', such as binance'}")
    return value


def _parse_exchange_config(name: str, raw: str) -> Mapping[str, Any]:
    if not raw.strip():
        return _empty_mapping()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        # Only the position, not the text: the JSON may hold a password or a key.
        raise ConfigError(
            f"{name} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
            'expected a JSON object such as {"timeout": 30000}'
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f'{name} is invalid: expected a JSON object such as {{"timeout": 30000}}, got a JSON {type(value).__name__}'
        )
    return MappingProxyType(value)


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "mode": _parse_choice(MODES),
    "live_confirm": _parse_text,
    "exchange": _parse_exchange,
    "exchange_config": _parse_exchange_config,
    "sandbox": _parse_bool,
    "symbol": _parse_symbol,
    "position_mode": _parse_optional_choice(POSITION_MODES),
    "api_key": _parse_secret,
    "api_secret": _parse_secret,
    "checkpoint": _parse_path,
    "state_dir": _parse_path,
    "paper_balance": _parse_float(0.0, lo_open=True),
    "commission": _parse_float(0.0, 0.05, hi_open=True),
    # 10,000 bps = 100%: a sell filled at a price <= 0 is meaningless.
    "slippage_bps": _parse_float(0.0, 10_000.0, hi_open=True),
    "max_position_quote": _parse_optional_positive,
    "max_drawdown": _parse_float(0.0, 1.0, lo_open=True),
    "online_learning": _parse_bool,
    "episode_steps": _parse_int(2),
    "min_episode_steps": _parse_int(1),
    "macro_every": _parse_int(1),
    "keep_checkpoints": _parse_int(1),
    # A policy's entropy over 3 actions is at most ln 3: a floor at or above it would roll back every update.
    "guard_min_entropy": _parse_float(0.0, math.log(3), hi_open=True),
    "guard_min_trade_prob": _parse_float(0.0, 1.0, hi_open=True),
    # numpy's generators reject negative seeds.
    "seed": _parse_int(0),
    "tick_delay_s": _parse_int(0, 240),
    "misfire_grace_s": _parse_int(1, _CANDLE_S - 1),
    "log_format": _parse_choice(LOG_FORMATS),
    "log_level": _parse_choice(LOG_LEVELS, upper=True),
    "notify_urls": _parse_notify_urls,
    "api_token": _parse_secret,
    "serve_host": _parse_host,
    "serve_port": _parse_int(1, 65535),
}


def env_name(field_name: str) -> str:
    """The environment variable of a Settings field, e.g. 'mode' -> 'RITMO_MODE'."""
    return ENV_PREFIX + field_name.upper()


KNOWN_KEYS: tuple[str, ...] = tuple(env_name(f.name) for f in fields(Settings))


# ---------------------------------------------------------------------------------------------------
# Cross-setting checks.
# ---------------------------------------------------------------------------------------------------


def _validate_episode_steps(s: Settings) -> None:
    if s.min_episode_steps > s.episode_steps:
        raise ConfigError(
            f"RITMO_MIN_EPISODE_STEPS={s.min_episode_steps} is invalid: expected at most "
            f"RITMO_EPISODE_STEPS ({s.episode_steps})"
        )


def _validate_tick_timing(s: Settings) -> None:
    if s.tick_delay_s + s.misfire_grace_s >= _CANDLE_S:
        raise ConfigError(
            f"RITMO_MISFIRE_GRACE_S={s.misfire_grace_s} is invalid: with RITMO_TICK_DELAY_S={s.tick_delay_s} "
            f"a late tick could start after the next candle closes; expected at most "
            f"{_CANDLE_S - 1 - s.tick_delay_s}"
        )


def validate_live(settings: Settings) -> None:
    """Refuse live trading without the confirmation phrase, API keys and a position cap (ConfigError)."""
    # Not called by load_settings: `ritmo status` must work in live mode without keys; `ritmo run` calls it.
    if settings.live_confirm != LIVE_CONFIRM_PHRASE:
        raise ConfigError(
            "RITMO_LIVE_CONFIRM does not hold the confirmation phrase: live mode trades real money; "
            f"set RITMO_LIVE_CONFIRM={LIVE_CONFIRM_PHRASE}"
        )
    for name in ("api_key", "api_secret"):
        if not getattr(settings, name):
            raise ConfigError(
                f"{env_name(name)} is missing: live mode needs it (in .env, the environment, "
                f"or the systemd credential {CREDENTIAL_NAMES[name]})"
            )
    if settings.max_position_quote is None:
        raise ConfigError(
            "RITMO_MAX_POSITION_QUOTE is missing: live mode needs a cap on the position's notional "
            "in the quote currency, e.g. RITMO_MAX_POSITION_QUOTE=100"
        )


# ---------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------


def _read_env_file(env_file: str | Path | None) -> dict[str, str]:
    """RITMO_* values of the .env file; a missing file is simply no file."""
    if env_file is None:
        return {}
    path = Path(env_file)
    if not path.is_file():
        return {}
    try:
        # interpolate=False: systemd's EnvironmentFile= does not expand ${VAR}, so neither do we.
        raw = dotenv_values(path, interpolate=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from None
    # A bare `KEY` line gives None: treat it as an empty value.
    return {k: (v or "") for k, v in raw.items() if k.startswith(ENV_PREFIX)}


def _read_credential(name: str, environ: Mapping[str, str]) -> str | None:
    """A systemd credential's value (LoadCredential=), or None when there is none."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read systemd credential {name}: {exc.__class__.__name__}") from None


def _check_unknown_keys(keys: set[str]) -> None:
    unknown = sorted(k for k in keys if k.startswith(ENV_PREFIX) and k not in KNOWN_KEYS)
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
        suggestion = f"did you mean {hint[0]}? " if hint else ""
        raise ConfigError(f"{key} is not a known setting: {suggestion}(the settings are listed in .env.example)")


def load_settings(env: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read, type and validate the RITMO_* settings; the environment wins over the .env file."""
    environ = os.environ if env is None else env
    from_env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    merged = {**_read_env_file(env_file), **from_env}
    _check_unknown_keys(set(merged))

    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = env_name(f.name)
        raw = merged.get(name, "")
        if f.name in CREDENTIAL_NAMES:
            credential = _read_credential(CREDENTIAL_NAMES[f.name], environ)
            if credential is not None:
                if raw.strip():
                    raise ConfigError(
                        f"{name} is set both in the environment/.env and as systemd credential "
                        f"{CREDENTIAL_NAMES[f.name]}: keep only one"
                    )
                raw = credential
        # An empty or absent value keeps the dataclass default.
        if raw.strip():
            values[f.name] = _PARSERS[f.name](name, raw)

    settings = Settings(**values)
    _validate_episode_steps(settings)
    _validate_tick_timing(settings)
    return settings


def symbol_slug(symbol: str) -> str:
    """File- and unit-name-safe form of a symbol: BTC/USDT -> BTC-USDT, BTC/USDT:USDT -> BTC-USDT-USDT."""
    return symbol.replace("/", "-").replace(":", "-")


def state_db_path(settings: Settings) -> Path:
    """The SQLite state file of this mode and symbol: STATE_DIR/<mode>-<symbol slug>.sqlite."""
    return settings.state_dir / f"{settings.mode}-{symbol_slug(settings.symbol)}.sqlite"
