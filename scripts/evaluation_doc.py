"""Regenerate docs/evaluation.md from the trials registry and the stored walk-forward reports.

    .venv/bin/python scripts/evaluation_doc.py

Reads `docs/evaluation-trials.jsonl` (one line per configuration evaluated, written by `ritmo evaluate`, plus
the quick probes run before it existed) and the reports copied into `docs/evaluation/<name>/` (results.json,
report.md, equity.png, sharpe.png). Writes `docs/evaluation.md`: every configuration tried and why, the trial
count that the deflated Sharpe uses, and the final test-fold verdict of each shipped configuration.
`make evaluation` re-runs the evaluations themselves (hours on 2 cores; resumable) before this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.offline.walk_forward import count_trials, read_trials  # noqa: E402

DOCS = REPO / "docs"
PREAMBLE = DOCS / "evaluation-preamble.md"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _figures(trial: dict) -> str:
    """The run's headline as the registry recorded it: pooled Sharpe (mean over seeds, daily, annualised)."""
    h = trial.get("summary")
    if not h:
        return "see note"
    return (
        f"{_fmt(h['policy_sharpe'])} (B&H {_fmt(h['buy_and_hold_sharpe'])}, best SMA {_fmt(h['best_sma_sharpe'])}); "
        f"return {_fmt(h['policy_return'], '+.1%')}; {_fmt(h['trades_per_day_min'], '.2f')}.."
        f"{_fmt(h['trades_per_day_max'], '.2f')} trades/day"
    )


def _settings(cfg: dict) -> str:
    keys = [
        ("objective", None),
        ("position_mode", None),
        ("decide_every", "K"),
        ("episode_steps", "L"),
        ("episodes_per_update", "B"),
        ("group_size", "M"),
        ("updates", "updates"),
        ("schedule", None),
        ("entropy_coef", "entropy"),
        ("cost_curriculum_updates", "curriculum"),
        ("trade_floor", "floor"),
        ("risk_aversion", "lambda"),
    ]
    parts = []
    for key, label in keys:
        v = cfg.get(key)
        if v in (None, 0, 0.0) and key in ("entropy_coef", "cost_curriculum_updates", "trade_floor", "risk_aversion"):
            continue
        if key == "group_size" and v == 1:
            continue
        parts.append(f"{label}={v}" if label else str(v))
    return ", ".join(parts)


def final_section(name: str) -> list[str]:
    """The verdict of one configuration's test folds: its targets and where its report is."""
    report = DOCS / "evaluation" / name / "results.json"
    if not report.exists():
        return [f"(no stored report for `{name}`)"]
    r = json.loads(report.read_text())
    h = r["headline"]
    t = h["targets"]
    lines = [
        f"### `{name}` ({r['config']['position_mode']}): {h['split']} folds pooled, commission {h['commission']}",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| every seed trades on every fold, 1/week .. 6/day | {h['units_never_traded']} runs never traded, "
        f"{_fmt(h['trades_per_day_min'], '.3f')} .. {_fmt(h['trades_per_day_max'], '.3f')} trades/day | "
        f"{t['trades_every_unit_in_range']} |",
        f"| beats flat | return {_fmt(h['policy_return'], '+.2%')} | {t['beats_flat']} |",
        f"| Sharpe >= buy & hold | {_fmt(h['policy_sharpe'])} [{_fmt(h['policy_sharpe_ci'][0])}, "
        f"{_fmt(h['policy_sharpe_ci'][1])}] vs {_fmt(h['buy_and_hold_sharpe'])} | "
        f"{t['sharpe_at_least_buy_and_hold']} |",
        f"| Sharpe >= best SMA rule | vs {_fmt(h['best_sma_sharpe'])} ({h['best_sma']}) | "
        f"{t['sharpe_at_least_best_sma']} |",
        f"| max drawdown < buy & hold | {_fmt(h['policy_max_drawdown'], '.2%')} vs "
        f"{_fmt(h['buy_and_hold_max_drawdown'], '.2%')} | {t['drawdown_below_buy_and_hold']} |",
        "",
        f"Deflated Sharpe {_fmt(h['deflated_sharpe'], '.3f')} over {h['n_trials']} trials. Full report with the cost "
        f"sweep, trade quality and per-fold tables: [evaluation/{name}/report.md](evaluation/{name}/report.md).",
        "",
        f"![equity per fold](evaluation/{name}/equity.png)",
        "",
    ]
    return lines


def main() -> None:
    """Write docs/evaluation.md."""
    trials = read_trials(DOCS / "evaluation-trials.jsonl")
    lines = ["# Evaluation: every configuration tried, and the verdict on the test folds", ""]
    if PREAMBLE.exists():
        lines += [PREAMBLE.read_text().rstrip(), ""]
    lines += [
        f"## Every configuration tried ({len(trials)} runs, {count_trials(trials)} configuration x seed trials)",
        "",
        "Chosen on validation folds only; a configuration's test folds are read once, at the end (split `test`).",
        "",
        "| # | name | split | seeds | settings | pooled Sharpe of the split read (at 0.1%) | why / what happened |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(trials, 1):
        lines.append(
            f"| {i} | `{t['name']}` | {t['split']} | {len(t['seeds'])} | {_settings(t['config'])} | "
            f"{_figures(t)} | {t.get('note', '')} |"
        )
    finals = sorted({t["name"] for t in trials if t["split"] == "test"})
    lines += ["", "## Test folds (read once)", ""]
    for name in finals:
        lines += final_section(name)
    (DOCS / "evaluation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'evaluation.md'} ({len(trials)} runs, {count_trials(trials)} trials)")


if __name__ == "__main__":
    main()
