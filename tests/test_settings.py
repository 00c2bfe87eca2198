"""Settings: defaults, precedence, one clear ConfigError per bad value, secrets kept out of sight."""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path

import pytest
from dotenv import dotenv_values

from bot.errors import EXIT_CONFIG, ConfigError
from bot.settings import (
    KNOWN_KEYS,
    LIVE_CONFIRM_PHRASE,
    Settings,
    load_settings,
    state_db_path,
    validate_live,
)

REPO = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = REPO / ".env.example"
KEY = "kEy1234567890ABCDEFghijklmnopQRSTUV"
SECRET = "sEcReT0987654321zyxwvuTSRQPONMLKJi"


def load(env: dict[str, str], env_file: Path | None = None) -> Settings:
    return load_settings(env=env, env_file=env_file)


# ---------------------------------------------------------------------------------------------------
# Defaults and precedence
# ---------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load({})
    assert s == Settings()
    assert (s.mode, s.exchange, s.symbol, s.position_mode) == ("paper", "binance", "BTC/USDT", "")
    assert dict(s.exchange_config) == {}
    assert s.sandbox is False and s.online_learning is True
    assert s.checkpoint == Path("checkpoints/default.pt") and s.state_dir == Path("state")
    assert (s.paper_balance, s.commission, s.slippage_bps) == (10_000.0, 0.001, 0.0)
    assert s.max_position_quote is None and s.max_drawdown == 0.5
    assert (s.episode_steps, s.min_episode_steps, s.macro_every, s.keep_checkpoints) == (288, 48, 11, 5)
    assert (s.seed, s.tick_delay_s, s.misfire_grace_s) == (0, 5, 120)
    assert (s.log_format, s.log_level) == ("auto", "INFO")
    assert (s.notify_urls, s.api_token, s.serve_host, s.serve_port) == ((), "", "127.0.0.1", 8080)


def test_notify_urls_are_parsed_masked_and_fed_to_the_redactor() -> None:
    s = load({"RITMO_NOTIFY_URLS": "tgram://123456:ABCDEFsecret/987654, json://127.0.0.1:9/hook?token=s3cretvalue"})
    assert s.notify_urls == ("tgram://123456:ABCDEFsecret/987654", "json://127.0.0.1:9/hook?token=s3cretvalue")
    assert s.redacted()["notify_urls"] == "***"
    assert "ABCDEFsecret" not in repr(s)
    secrets = s.secret_values()
    assert "123456:ABCDEFsecret" in secrets and "s3cretvalue" in secrets
    with pytest.raises(ConfigError) as err:
        load({"RITMO_NOTIFY_URLS": "not-a-url-but-a-Secret"})
    assert "Secret" not in str(err.value) and "RITMO_NOTIFY_URLS" in str(err.value)


def test_api_token_is_a_secret() -> None:
    s = load({"RITMO_API_TOKEN": "tok-0123456789abcdef"})
    assert s.api_token == "tok-0123456789abcdef"
    assert "tok-0123456789abcdef" not in repr(s) and "tok-0123456789abcdef" in s.secret_values()


def test_every_field_has_a_known_key() -> None:
    assert len(KNOWN_KEYS) == len(fields(Settings)) == 32  # 26 + the learning guard's two floors + the cockpit's four


def test_environment_wins_over_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("RITMO_MODE=replay\nRITMO_SEED=7\nRITMO_SYMBOL=ETH/USDT\nOTHER_TOOL=ignored\n")
    s = load({"RITMO_SEED": "9", "PATH": "/usr/bin"}, env_file)
    assert (s.mode, s.seed, s.symbol) == ("replay", 9, "ETH/USDT")


def test_missing_env_file_is_no_file(tmp_path: Path) -> None:
    assert load({}, tmp_path / "absent.env") == Settings()


def test_empty_value_means_default() -> None:
    s = load({"RITMO_EPISODE_STEPS": "", "RITMO_MAX_POSITION_QUOTE": " ", "RITMO_MODE": ""})
    assert (s.episode_steps, s.max_position_quote, s.mode) == (288, None, "paper")


def test_file_is_not_copied_into_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("RITMO_")]:
        monkeypatch.delenv(key)
    env_file = tmp_path / ".env"
    env_file.write_text("RITMO_SEED=3\n")
    assert load_settings(env_file=env_file).seed == 3
    assert "RITMO_SEED" not in os.environ


def test_values_are_parsed() -> None:
    s = load(
        {
            "RITMO_MODE": "LIVE",
            "RITMO_SANDBOX": "Yes",
            "RITMO_ONLINE_LEARNING": "0",
            "RITMO_EXCHANGE": "binanceusdm",
            "RITMO_EXCHANGE_CONFIG": '{"timeout": 30000, "options": {"defaultType": "future"}}',
            "RITMO_SYMBOL": "BTC/USDT:USDT",
            "RITMO_POSITION_MODE": "long_short",
            "RITMO_MAX_POSITION_QUOTE": "250.5",
            "RITMO_LOG_LEVEL": "debug",
            "RITMO_MIN_EPISODE_STEPS": "288",
        }
    )
    assert s.mode == "live" and s.sandbox is True and s.online_learning is False
    assert s.exchange_config["options"] == {"defaultType": "future"}
    assert s.max_position_quote == 250.5 and s.log_level == "DEBUG" and s.min_episode_steps == 288
    with pytest.raises(TypeError):
        s.exchange_config["timeout"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("symbol", "mode", "expected"),
    [
        ("BTC/USDT", "paper", "state/paper-BTC-USDT.sqlite"),
        ("BTC/USDT:USDT", "live", "state/live-BTC-USDT-USDT.sqlite"),
        ("ETH/BTC", "replay", "state/replay-ETH-BTC.sqlite"),
    ],
)
def test_state_db_path(symbol: str, mode: str, expected: str) -> None:
    s = load({"RITMO_SYMBOL": symbol, "RITMO_MODE": mode})
    assert state_db_path(s) == Path(expected)


# ---------------------------------------------------------------------------------------------------
# Bad values: one line, naming the setting, exit code 78
# ---------------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("RITMO_MODE", "papr", "one of paper, live, replay"),
    ("RITMO_EXCHANGE", "binanse", "did you mean binance"),
    ("RITMO_EXCHANGE", "Bin ance", "ccxt exchange id"),
    ("RITMO_EXCHANGE_CONFIG", "{timeout: 1}", "not valid JSON"),
    ("RITMO_EXCHANGE_CONFIG", "[1, 2]", "JSON object"),
    ("RITMO_EXCHANGE_CONFIG", '"text"', "JSON object"),
    ("RITMO_SANDBOX", "maybe", "true/false"),
    ("RITMO_SYMBOL", "BTCUSDT", "BASE/QUOTE"),
    ("RITMO_SYMBOL", "BTC/", "BASE/QUOTE"),
    ("RITMO_POSITION_MODE", "short", "long_short, long_only"),
    ("RITMO_PAPER_BALANCE", "0", "> 0"),
    ("RITMO_PAPER_BALANCE", "lots", "> 0"),
    ("RITMO_PAPER_BALANCE", "inf", "> 0"),
    ("RITMO_COMMISSION", "0.05", "[0, 0.05)"),
    ("RITMO_COMMISSION", "-0.001", "[0, 0.05)"),
    ("RITMO_SLIPPAGE_BPS", "-1", "[0, 10000)"),
    ("RITMO_SLIPPAGE_BPS", "nan", "[0, 10000)"),
    ("RITMO_MAX_POSITION_QUOTE", "0", "> 0"),
    ("RITMO_MAX_POSITION_QUOTE", "ten", "> 0"),
    ("RITMO_MAX_DRAWDOWN", "0", "(0, 1]"),
    ("RITMO_MAX_DRAWDOWN", "1.5", "(0, 1]"),
    ("RITMO_ONLINE_LEARNING", "on", "true/false"),
    ("RITMO_EPISODE_STEPS", "1", ">= 2"),
    ("RITMO_EPISODE_STEPS", "288.5", ">= 2"),
    ("RITMO_MIN_EPISODE_STEPS", "0", ">= 1"),
    ("RITMO_MIN_EPISODE_STEPS", "289", "at most RITMO_EPISODE_STEPS"),
    ("RITMO_MACRO_EVERY", "0", ">= 1"),
    ("RITMO_KEEP_CHECKPOINTS", "0", ">= 1"),
    ("RITMO_GUARD_MIN_ENTROPY", "-0.1", "[0, 1.09861)"),
    ("RITMO_GUARD_MIN_ENTROPY", "1.2", "[0, 1.09861)"),
    ("RITMO_GUARD_MIN_TRADE_PROB", "1", "[0, 1)"),
    ("RITMO_GUARD_MIN_TRADE_PROB", "nan", "[0, 1)"),
    ("RITMO_SEED", "-1", ">= 0"),
    ("RITMO_SEED", "abc", ">= 0"),
    ("RITMO_TICK_DELAY_S", "241", "0 to 240"),
    ("RITMO_MISFIRE_GRACE_S", "0", "1 to 299"),
    ("RITMO_MISFIRE_GRACE_S", "296", "at most 294"),
    ("RITMO_LOG_FORMAT", "pretty", "auto, json, console"),
    ("RITMO_LOG_LEVEL", "TRACE", "DEBUG, INFO, WARNING, ERROR"),
    ("RITMO_CHECKPOINT", "a\0b", "path"),
    ("RITMO_API_KEY", "two words", "whitespace"),
    ("RITMO_API_SECRET", "tab\there", "whitespace"),
    ("RITMO_API_TOKEN", "two words", "whitespace"),
    ("RITMO_NOTIFY_URLS", "telegram-bot", "Apprise URL"),
    ("RITMO_SERVE_HOST", "http://0.0.0.0/", "host name or IP address"),
    ("RITMO_SERVE_PORT", "0", "1 to 65535"),
]


@pytest.mark.parametrize(("name", "value", "hint"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_bad_value_names_the_setting(name: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({name: value})
    message = str(info.value)
    assert message.startswith(name), message
    assert hint in message, message
    assert "\n" not in message
    assert info.value.exit_code == EXIT_CONFIG


def test_bad_value_in_file_is_reported_too(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("RITMO_MODE=papr\n")
    with pytest.raises(ConfigError, match=r"^RITMO_MODE='papr' is invalid: expected one of paper, live, replay$"):
        load({}, env_file)


def test_every_setting_has_a_bad_value_case() -> None:
    # Free text settings accept anything printable.
    free_text = {"RITMO_LIVE_CONFIRM", "RITMO_STATE_DIR"}
    covered = {name for name, _, _ in BAD_VALUES} | free_text
    assert covered == set(KNOWN_KEYS)


@pytest.mark.parametrize(("key", "suggestion"), [("RITMO_MOD", "RITMO_MODE"), ("RITMO_APIKEY", "RITMO_API_KEY")])
def test_unknown_key_is_rejected(key: str, suggestion: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{key} is not a known setting: did you mean {suggestion}"):
        load({key: "paper"})
    env_file = tmp_path / ".env"
    env_file.write_text(f"{key}=x\n")
    with pytest.raises(ConfigError, match=key):
        load({}, env_file)


def test_unknown_key_far_from_any_setting() -> None:
    with pytest.raises(ConfigError, match=r"^RITMO_ZZZZZZZZ is not a known setting: \(the settings"):
        load({"RITMO_ZZZZZZZZ": "1"})


# ---------------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------------


def test_secrets_masked_in_repr_and_redacted() -> None:
    s = load(
        {
            "RITMO_API_KEY": KEY,
            "RITMO_API_SECRET": SECRET,
            "RITMO_EXCHANGE_CONFIG": (
                '{"password": "hunter2hunter2", "proxies": {"https": "http://bob:pw12345678@proxy:3128"}}'
            ),
        }
    )
    for text in (repr(s), str(s), repr(s.redacted()), str([s])):
        assert KEY not in text and SECRET not in text
        assert "hunter2hunter2" not in text and "pw12345678" not in text
    red = s.redacted()
    assert red["api_key"] == "***" and red["api_secret"] == "***"
    assert red["exchange_config"]["password"] == "***"
    assert red["exchange_config"]["proxies"]["https"] == "http://***@proxy:3128"
    assert set(s.secret_values()) == {KEY, SECRET, "hunter2hunter2", "bob:pw12345678"}
    assert load({}).redacted()["api_key"] == ""


def test_redacted_is_json_able() -> None:
    assert json.loads(json.dumps(load({"RITMO_EXCHANGE_CONFIG": '{"a": [1]}'}).redacted()))["exchange_config"]


def test_secrets_never_in_errors(tmp_path: Path) -> None:
    bad_config = '{"apiKey": "' + KEY + '", oops}'
    cases = [
        {"RITMO_API_KEY": KEY + " x"},
        {"RITMO_API_SECRET": SECRET + "\n" + SECRET},
        {"RITMO_EXCHANGE_CONFIG": bad_config},
        {"RITMO_API_KEY": KEY, "RITMO_API_SECRET": SECRET, "RITMO_MODE": "bad"},
    ]
    for env in cases:
        with pytest.raises(ConfigError) as info:
            load(env)
        assert KEY not in str(info.value) and SECRET not in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_live(load({"RITMO_API_KEY": KEY, "RITMO_API_SECRET": SECRET}))
    assert KEY not in str(info.value) and SECRET not in str(info.value)


def test_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ritmo_api_key").write_text(KEY + "\n")  # `echo` leaves a newline
    (creds / "ritmo_api_secret").write_text(SECRET)
    s = load({"CREDENTIALS_DIRECTORY": str(creds)})
    assert (s.api_key, s.api_secret) == (KEY, SECRET)
    # Only one file: the other setting still comes from the environment.
    (creds / "ritmo_api_secret").unlink()
    s = load({"CREDENTIALS_DIRECTORY": str(creds), "RITMO_API_SECRET": SECRET})
    assert (s.api_key, s.api_secret) == (KEY, SECRET)


def test_credential_and_env_both_set_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "ritmo_api_key").write_text(KEY)
    with pytest.raises(ConfigError, match=r"^RITMO_API_KEY is set both") as info:
        load({"CREDENTIALS_DIRECTORY": str(tmp_path), "RITMO_API_KEY": "other-key-value"})
    assert KEY not in str(info.value) and "other-key-value" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Live prerequisites
# ---------------------------------------------------------------------------------------------------

LIVE_OK = {
    "RITMO_MODE": "live",
    "RITMO_LIVE_CONFIRM": LIVE_CONFIRM_PHRASE,
    "RITMO_API_KEY": KEY,
    "RITMO_API_SECRET": SECRET,
    "RITMO_MAX_POSITION_QUOTE": "100",
}


def test_validate_live_accepts_complete_settings() -> None:
    validate_live(load(LIVE_OK))


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"RITMO_LIVE_CONFIRM": ""}, "RITMO_LIVE_CONFIRM"),
        ({"RITMO_LIVE_CONFIRM": "i understand this trades real money"}, "RITMO_LIVE_CONFIRM"),
        ({"RITMO_API_KEY": ""}, "RITMO_API_KEY"),
        ({"RITMO_API_SECRET": ""}, "RITMO_API_SECRET"),
        ({"RITMO_MAX_POSITION_QUOTE": ""}, "RITMO_MAX_POSITION_QUOTE"),
    ],
)
def test_validate_live_refuses(change: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError, match=f"^{setting} ") as info:
        validate_live(load({**LIVE_OK, **change}))
    assert info.value.exit_code == EXIT_CONFIG


# ---------------------------------------------------------------------------------------------------
# .env.example: parsed the same by python-dotenv and systemd, and it holds exactly the defaults
# ---------------------------------------------------------------------------------------------------


def parse_systemd_environment_file(text: str) -> dict[str, str]:
    """A small model of systemd's EnvironmentFile= parser, enough for plain KEY=value files.

    systemd skips blank lines and lines starting with # or ;, splits at the first '=', strips
    whitespace around key and value, and removes one pair of enclosing quotes. It does not expand
    ${VAR}, does not know `export`, and keeps ` # ...` after a value as part of the value.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def test_env_example_is_plain_key_value() -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"RITMO_[A-Z_]+=[^\s'\"\\$#]*", line), f"not a plain KEY=value line: {line!r}"


def test_env_example_parses_the_same_for_dotenv_and_systemd() -> None:
    with_dotenv = {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE).items()}
    with_systemd = parse_systemd_environment_file(ENV_EXAMPLE.read_text())
    assert with_dotenv == with_systemd


def test_confirmation_phrase_line_parses_the_same(tmp_path: Path) -> None:
    # Unquoted spaces: both parsers keep the whole phrase, so it can be written as plainly as documented.
    env_file = tmp_path / "live.env"
    env_file.write_text(f"RITMO_LIVE_CONFIRM={LIVE_CONFIRM_PHRASE}\n")
    assert dotenv_values(env_file)["RITMO_LIVE_CONFIRM"] == LIVE_CONFIRM_PHRASE
    assert parse_systemd_environment_file(env_file.read_text())["RITMO_LIVE_CONFIRM"] == LIVE_CONFIRM_PHRASE
    assert load({}, env_file).live_confirm == LIVE_CONFIRM_PHRASE


def test_env_example_lists_every_setting_once_with_a_comment() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    keys = [line.split("=", 1)[0] for line in lines if line.startswith("RITMO_")]
    assert keys == list(KNOWN_KEYS)
    for i, line in enumerate(lines):
        if line.startswith("RITMO_"):
            assert lines[i - 1].startswith("# "), f"{line} has no comment line above it"


def test_env_example_holds_the_defaults() -> None:
    assert load({}, ENV_EXAMPLE) == Settings()
    assert LIVE_CONFIRM_PHRASE in ENV_EXAMPLE.read_text()
