"""The figures, tables and plots of `ritmo evaluate`: results.json, report.md, equity.png and sharpe.png.

Pooled figures join the folds' daily log returns in time order (the periods of one split never overlap).
"Mean over seeds" is taken per figure; intervals are moving-block bootstraps (5-day blocks) of the daily log
returns averaged over seeds, the portfolio that holds every seed's policy in equal parts. Sharpe ratios in
the pooled tables are annualised from daily returns (x sqrt(365)); per-fold tables also show the backtest's
own Sharpe from 5-minute returns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from strategies.evaluation import (
    bootstrap_ci,
    deflated_sharpe_ratio,
    sample_skew_kurtosis,
    sharpe_ratio,
    summarize_seeds,
)

DAYS_PER_YEAR = 365
BLOCK_DAYS = 5
TRADES_PER_DAY_RANGE = (1 / 7, 6.0)  # the "between 1 trade a week and 6 a day"
BASELINE_LABELS = {
    "flat": "flat",
    "buy_and_hold": "buy & hold",
    "sma_1d_5d_long_only": "SMA 1d/5d long_only",
    "sma_1d_5d_long_short": "SMA 1d/5d long_short",
    "sma_2d_8d_long_only": "SMA 2d/8d long_only",
    "sma_2d_8d_long_short": "SMA 2d/8d long_short",
}


def _f(x: Any) -> float | None:
    return float(x) if x is not None and isinstance(x, int | float) and math.isfinite(x) else None


def _series(figs: list[dict[str, Any]]) -> pd.Series:
    """Daily log returns of several folds (one strategy, one seed) joined in time order."""
    parts = [pd.Series(f["daily"]["log_return"], index=f["daily"]["day_ms"], dtype=float) for f in figs]
    s = pd.concat(parts) if parts else pd.Series(dtype=float)
    return s[~s.index.duplicated()].sort_index()


def _sharpe_ann(daily: np.ndarray) -> float:
    return sharpe_ratio(daily, DAYS_PER_YEAR)


def _max_drawdown(daily: np.ndarray) -> float:
    eq = np.exp(np.concatenate([[0.0], np.cumsum(daily)]))
    return float(np.max(1 - eq / np.maximum.accumulate(eq)))


def _pooled_strategy(per_seed: list[pd.Series]) -> dict[str, Any]:
    """Pooled figures of one strategy from its daily series per seed (one series for a deterministic one)."""
    frame = pd.concat(per_seed, axis=1).dropna()
    mean_daily = frame.mean(axis=1).to_numpy()
    srs = [_sharpe_ann(frame[c].to_numpy()) for c in frame.columns]
    return {
        "days": len(frame),
        "total_return_per_seed": [float(math.expm1(frame[c].sum())) for c in frame.columns],
        "total_return": summarize_seeds([float(math.expm1(frame[c].sum())) for c in frame.columns])["mean"],
        "sharpe_per_seed": [_f(s) for s in srs],
        "sharpe": summarize_seeds([_f(s) for s in srs])["mean"],
        "daily_sr_per_seed": [_f(s / math.sqrt(DAYS_PER_YEAR)) for s in srs],
        "sharpe_of_mean": _f(_sharpe_ann(mean_daily)),
        "sharpe_ci": [_f(v) for v in bootstrap_ci(mean_daily, _sharpe_ann, block=BLOCK_DAYS)],
        "max_drawdown": summarize_seeds([_max_drawdown(frame[c].to_numpy()) for c in frame.columns])["mean"],
        "_mean_daily": mean_daily,
        "_index": frame.index.to_numpy(),
    }


def _unit_figs(results: list[dict[str, Any]], split: str, cost: str, who: str) -> dict[int, list[dict[str, Any]]]:
    """{seed: [figures per fold in fold order]} of the policy or the random baseline."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r["seed"], r["fold"])):
        out.setdefault(r["seed"], []).append(r["splits"][split][cost][who])
    return out


def _mean_of(figs: list[dict[str, Any]], key: str) -> float | None:
    return summarize_seeds([_f(f.get(key)) for f in figs])["mean"]


def pooled_figures(
    results: list[dict[str, Any]],
    baselines: dict[int, dict[str, dict[str, Any]]],
    split: str,
    cost: str,
    n_trials: int,
    trial_srs: list[float],
) -> dict[str, Any]:
    """Pooled figures of the policy, the random baseline and every other baseline for one split and cost."""
    pol_units = _unit_figs(results, split, cost, "policy")
    rnd_units = _unit_figs(results, split, cost, "random")
    pol = _pooled_strategy([_series(v) for v in pol_units.values()])
    all_pol = [f for v in pol_units.values() for f in v]
    pol.update(
        {
            "trades_per_day": _mean_of(all_pol, "trades_per_day"),
            "trades_per_day_min": min(f["trades_per_day"] for f in all_pol),
            "trades_per_day_max": max(f["trades_per_day"] for f in all_pol),
            "avg_holding_hours": _mean_of(all_pol, "avg_holding_hours"),
            "win_rate": _mean_of(all_pol, "win_rate"),
            "profit_factor": _mean_of(all_pol, "profit_factor"),
            "fees_frac_of_start_equity": _mean_of(all_pol, "fees_frac_of_start_equity"),
            "edge_per_trade_bps": _mean_of(all_pol, "edge_per_trade_bps"),
            "edge_over_fee": _mean_of(all_pol, "edge_over_fee"),
            "units_never_traded": sum(1 for f in all_pol if f["n_trades"] == 0),
            "seeds_never_traded_somewhere": sum(1 for v in pol_units.values() if any(f["n_trades"] == 0 for f in v)),
            "units": len(all_pol),
        }
    )
    base: dict[str, Any] = {}
    folds = sorted(baselines)
    for name in BASELINE_LABELS:
        base[name] = _pooled_strategy([_series([baselines[i][cost][name] for i in folds])])
    base["random"] = _pooled_strategy([_series(v) for v in rnd_units.values()])
    hold = pd.Series(base["buy_and_hold"]["_mean_daily"], index=base["buy_and_hold"]["_index"])
    mine = pd.Series(pol["_mean_daily"], index=pol["_index"])
    diff = (mine - hold).dropna().to_numpy()
    pol["daily_diff_to_hold_bps"] = _f(float(np.mean(diff)) * 1e4) if diff.size else None
    pol["daily_diff_to_hold_ci_bps"] = [
        _f(v * 1e4) if v is not None and math.isfinite(v) else None
        for v in bootstrap_ci(diff, lambda x: float(np.mean(x)), block=BLOCK_DAYS)
    ]
    skew, kurt = sample_skew_kurtosis(pol["_mean_daily"])
    sr_daily = (pol["sharpe_of_mean"] or float("nan")) / math.sqrt(DAYS_PER_YEAR)
    srs = [s for s in [*trial_srs, *pol["daily_sr_per_seed"]] if s is not None]
    var = float(np.var(srs, ddof=1)) if len(srs) >= 2 else 0.0
    pol["deflated_sharpe"] = _f(
        deflated_sharpe_ratio(sr_daily, var, max(n_trials, 1), len(pol["_mean_daily"]), skew, kurt)
    )
    pol["n_trials"] = n_trials
    best_sma = max(
        (k for k in base if k.startswith("sma_")),
        key=lambda k: base[k]["sharpe"] if base[k]["sharpe"] is not None else -9,
    )
    pol["best_sma"] = best_sma
    return {"policy": pol, "baselines": base}


def _strip(obj: Any) -> Any:
    """Drop the private arrays (keys starting with _) before JSON."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def fold_table(results: list[dict[str, Any]], baselines: dict[int, Any], split: str, cost: str) -> list[dict[str, Any]]:
    """Per-fold rows: the policy's figures as mean (and std) over seeds beside the baselines'."""
    rows = []
    for i in sorted(baselines):
        figs = [r["splits"][split][cost]["policy"] for r in results if r["fold"] == i]
        rnd = [r["splits"][split][cost]["random"] for r in results if r["fold"] == i]
        b = baselines[i][cost]
        rows.append(
            {
                "fold": i,
                "policy_return": summarize_seeds([f["total_return"] for f in figs]),
                "policy_sharpe_5m": summarize_seeds([_f(f["sharpe"]) for f in figs]),
                "policy_max_drawdown": summarize_seeds([f["max_drawdown"] for f in figs]),
                "policy_trades_per_day": summarize_seeds([f["trades_per_day"] for f in figs]),
                "policy_never_traded": sum(1 for f in figs if f["n_trades"] == 0),
                "random_return": summarize_seeds([f["total_return"] for f in rnd])["mean"],
                **{f"{k}_return": b[k]["total_return"] for k in BASELINE_LABELS},
                **{f"{k}_sharpe_5m": _f(b[k]["sharpe"]) for k in BASELINE_LABELS},
                "buy_and_hold_max_drawdown": b["buy_and_hold"]["max_drawdown"],
            }
        )
    return rows


def build_report(
    *,
    name: str,
    config: dict[str, Any],
    folds: list[Any],
    splits: list[str],
    costs: list[float],
    results: list[dict[str, Any]],
    baselines: dict[str, dict[int, dict[str, dict[str, Any]]]],
    n_trials: int,
    trial_srs: list[float],
    out: Path,
) -> dict[str, Any]:
    """Compute every figure, write results.json, report.md and the PNGs under `out`; return the figures."""
    pooled: dict[str, dict[str, Any]] = {}
    per_fold: dict[str, dict[str, Any]] = {}
    for split in splits:
        pooled[split] = {}
        per_fold[split] = {}
        for cost in costs:
            c = str(cost)
            pooled[split][c] = pooled_figures(results, baselines[split], split, c, n_trials, trial_srs)
            per_fold[split][c] = fold_table(results, baselines[split], split, c)
    main_split = splits[-1]
    main_cost = str(config["commission"])
    headline = _headline(pooled[main_split].get(main_cost) or pooled[main_split][str(costs[0])], main_split, main_cost)
    report = {
        "name": name,
        "config": config,
        "folds": [
            {"index": f.index, **{k: [_iso(v) for v in getattr(f, k)] for k in ("train", "valid", "test")}}
            for f in folds
        ],
        "splits": splits,
        "costs": costs,
        "n_trials": n_trials,
        "headline": headline,
        "pooled": pooled,
        "per_fold": per_fold,
        "units": [{k: v for k, v in r.items() if k != "splits"} for r in results],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_strip(report), indent=1, default=str))
    (out / "report.md").write_text(render_markdown(_strip(report)))
    plot_equity(results, baselines[main_split], main_split, main_cost, out / "equity.png", name)
    plot_sharpe(results, baselines[main_split], main_split, main_cost, out / "sharpe.png", name)
    return _strip(report)


def _iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").strftime("%Y-%m-%d")


def _headline(p: dict[str, Any], split: str, cost: str) -> dict[str, Any]:
    """The issue's targets on the pooled figures: each with its number and whether it is met."""
    pol, base = p["policy"], p["baselines"]
    hold, sma = base["buy_and_hold"], base[pol["best_sma"]]
    lo, hi = TRADES_PER_DAY_RANGE
    return {
        "split": split,
        "commission": float(cost),
        "policy_return": pol["total_return"],
        "policy_sharpe": pol["sharpe"],
        "policy_sharpe_ci": pol["sharpe_ci"],
        "policy_max_drawdown": pol["max_drawdown"],
        "buy_and_hold_return": hold["total_return"],
        "buy_and_hold_sharpe": hold["sharpe"],
        "buy_and_hold_max_drawdown": hold["max_drawdown"],
        "best_sma": pol["best_sma"],
        "best_sma_sharpe": sma["sharpe"],
        "trades_per_day_min": pol["trades_per_day_min"],
        "trades_per_day_max": pol["trades_per_day_max"],
        "units_never_traded": pol["units_never_traded"],
        "deflated_sharpe": pol["deflated_sharpe"],
        "n_trials": pol["n_trials"],
        "targets": {
            "trades_every_unit_in_range": bool(
                pol["units_never_traded"] == 0 and pol["trades_per_day_min"] >= lo and pol["trades_per_day_max"] <= hi
            ),
            "beats_flat": bool((pol["total_return"] or 0) > 0),
            "sharpe_at_least_buy_and_hold": _ge(pol["sharpe"], hold["sharpe"]),
            "sharpe_at_least_best_sma": _ge(pol["sharpe"], sma["sharpe"]),
            "drawdown_below_buy_and_hold": bool(pol["max_drawdown"] < hold["max_drawdown"]),
        },
    }


def _ge(a: float | None, b: float | None) -> bool:
    return a is not None and (b is None or a >= b)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:+.2%}"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render_markdown(r: dict[str, Any]) -> str:
    """report.md: the configuration, the folds, the targets, then per split the pooled tables per cost and the
    per-fold table."""
    lines = _intro(r) + _targets(r["headline"])
    for split in r["splits"]:
        lines += _pooled_tables(r["pooled"][split], split) + _per_fold_table(r, split)
    lines += ["", "![equity per fold](equity.png)", "", "![Sharpe per fold](sharpe.png)", ""]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: the header, its rule and one line per row."""
    return [_row(header), "|" + "---|" * len(header)] + [_row(cells) for cells in rows]


def _row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _intro(r: dict[str, Any]) -> list[str]:
    cfg = r["config"]
    lines = [f"# Walk-forward evaluation: `{r['name']}`", ""]
    lines += [
        f"Objective `{cfg['objective']}`, {cfg['position_mode']}, decide every {cfg['decide_every']} candles, "
        f"{cfg['episodes_per_update']} episodes ({cfg['group_size']} per start) x {cfg['episode_steps']} decisions, "
        f"{cfg['updates']} updates, schedule {cfg['schedule']}, trained at commission {cfg['commission']}. "
        f"Splits read: {', '.join(r['splits'])}. Trials counted for the deflated Sharpe: {r['n_trials']}.",
        "",
        "Figures are net of fees, out of sample (each fold trains on its training months only; the checkpoint "
        "kept is the best on that fold's validation months). The policy samples its actions as the daemon does; "
        "its figures are means over seeds. Short borrow and funding costs are not modelled.",
        "",
    ]
    folds = [[str(f["index"]), *(" .. ".join(f[k]) for k in ("train", "valid", "test"))] for f in r["folds"]]
    return lines + _table(["fold", "train", "valid", "test"], folds)


def _targets(h: dict[str, Any]) -> list[str]:
    t = h["targets"]
    trades = (
        f"{h['units_never_traded']} runs never traded; trades/day {_num(h['trades_per_day_min'], '{:.3f}')} .. "
        f"{_num(h['trades_per_day_max'], '{:.3f}')}"
    )
    sharpe = f"{_num(h['policy_sharpe'])} (95% CI {_ci(h['policy_sharpe_ci'])}) vs {_num(h['buy_and_hold_sharpe'])}"
    rows = [
        ["every seed trades on every fold, 1/week .. 6/day", trades, _yes(t["trades_every_unit_in_range"])],
        ["beats flat", f"return {_pct(h['policy_return'])}", _yes(t["beats_flat"])],
        ["Sharpe >= buy & hold", sharpe, _yes(t["sharpe_at_least_buy_and_hold"])],
        [
            "Sharpe >= best SMA rule",
            f"{_num(h['policy_sharpe'])} vs {_num(h['best_sma_sharpe'])} ({h['best_sma']})",
            _yes(t["sharpe_at_least_best_sma"]),
        ],
        [
            "max drawdown < buy & hold",
            f"{_pct(h['policy_max_drawdown'])} vs {_pct(h['buy_and_hold_max_drawdown'])}",
            _yes(t["drawdown_below_buy_and_hold"]),
        ],
    ]
    lines = ["", f"## Targets ({h['split']} folds pooled, commission {h['commission']})", ""]
    lines += _table(["target", "measured", "met"], rows)
    return [
        *lines,
        "",
        f"Deflated Sharpe ratio (probability that the Sharpe beats the best of {h['n_trials']} null trials): "
        f"{_num(h['deflated_sharpe'], '{:.3f}')}.",
    ]


def _pooled_tables(pooled: dict[str, Any], split: str) -> list[str]:
    sweep, quality = [], []
    for cost, p in pooled.items():
        pol = p["policy"]
        sweep.append([cost, "**policy** (mean of seeds)", *_returns(pol), _num(pol["trades_per_day"], "{:.3f}")])
        sweep += [
            [cost, BASELINE_LABELS.get(name, "random, policy's turnover"), *_returns(b), ""]
            for name, b in p["baselines"].items()
        ]
        quality.append(_quality(cost, pol))
    lines = ["", f"## Pooled {split} folds, cost sweep", ""]
    header = ["commission", "strategy", "return", "Sharpe (daily, ann.)", "95% CI", "max DD", "trades/day"]
    lines += _table(header, sweep)
    lines += ["", f"### Policy trade quality, {split} folds", ""]
    header = [
        "commission",
        "trades/day",
        "avg holding (h)",
        "win rate",
        "profit factor",
        "fees (x start equity)",
        "edge/trade (bps)",
        "edge / fee",
        "daily diff to B&H (bps, 95% CI)",
        "deflated Sharpe",
        "runs never traded",
    ]
    return lines + _table(header, quality)


def _returns(figs: dict[str, Any]) -> list[str]:
    """return, Sharpe, its CI and max drawdown of one pooled strategy."""
    return [_pct(figs["total_return"]), _num(figs["sharpe"]), _ci(figs["sharpe_ci"]), _pct(figs["max_drawdown"])]


def _quality(cost: str, pol: dict[str, Any]) -> list[str]:
    diff = f"{_num(pol['daily_diff_to_hold_bps'], '{:+.1f}')} ({_ci(pol['daily_diff_to_hold_ci_bps'], '{:+.1f}')})"
    return [
        cost,
        _num(pol["trades_per_day"], "{:.3f}"),
        _num(pol["avg_holding_hours"], "{:.1f}"),
        _num(pol["win_rate"], "{:.1%}"),
        _num(pol["profit_factor"]),
        _num(pol["fees_frac_of_start_equity"], "{:.3f}"),
        _num(pol["edge_per_trade_bps"], "{:.1f}"),
        _num(pol["edge_over_fee"]),
        diff,
        _num(pol["deflated_sharpe"], "{:.3f}"),
        f"{pol['units_never_traded']} of {pol['units']}",
    ]


def _per_fold_table(r: dict[str, Any], split: str) -> list[str]:
    per_fold = r["per_fold"][split]
    cost0 = str(r["config"]["commission"])
    cost0 = cost0 if cost0 in per_fold else next(iter(per_fold))
    lines = ["", f"### Per fold, {split}, commission {cost0} (policy: mean ± std over seeds)", ""]
    header = [
        "fold",
        "policy return",
        "policy Sharpe (5m)",
        "policy max DD",
        "trades/day",
        "never traded",
        "random",
        "B&H",
        "B&H Sharpe",
        "SMA 1d/5d LO",
        "SMA 2d/8d LO",
        "flat",
    ]
    rows = []
    for row in per_fold[cost0]:
        pr = row["policy_return"]
        rows.append(
            [
                str(row["fold"]),
                f"{_pct(pr['mean'])} ± {_num(pr['std'], '{:.2%}')}",
                _num(row["policy_sharpe_5m"]["mean"]),
                _pct(row["policy_max_drawdown"]["mean"]),
                _num(row["policy_trades_per_day"]["mean"], "{:.3f}"),
                str(row["policy_never_traded"]),
                _pct(row["random_return"]),
                _pct(row["buy_and_hold_return"]),
                _num(row["buy_and_hold_sharpe_5m"]),
                _pct(row["sma_1d_5d_long_only_return"]),
                _pct(row["sma_2d_8d_long_only_return"]),
                _pct(row["flat_return"]),
            ]
        )
    return lines + _table(header, rows)


def _yes(b: bool) -> str:
    return "yes" if b else "**no**"


def _ci(ci: list[Any] | None, fmt: str = "{:.2f}") -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (a server has no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_equity(
    results: list[dict[str, Any]], baselines: dict[int, Any], split: str, cost: str, path: Path, title: str
) -> None:
    """One panel per fold: each seed's policy equity (daily marks) beside buy & hold, SMA 1d/5d and flat."""
    plt = _pyplot()
    folds = sorted(baselines)
    cols = min(4, len(folds))
    rows = math.ceil(len(folds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, i in zip(axes.flat, folds, strict=False):
        for r in (r for r in results if r["fold"] == i):
            _plot_curve(ax, r["splits"][split][cost]["policy"], color="tab:blue", lw=0.8, alpha=0.6)
        _plot_curve(ax, baselines[i][cost]["buy_and_hold"], color="tab:orange", lw=1.2, label="buy & hold")
        _plot_curve(ax, baselines[i][cost]["sma_1d_5d_long_only"], color="tab:green", lw=1.0, label="SMA 1d/5d LO")
        _plot_curve(ax, baselines[i][cost]["flat"], color="grey", lw=0.8, ls="--", label="flat")
        ax.set_title(f"fold {i} ({split})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(folds) :]:
        ax.axis("off")
    axes.flat[0].plot([], [], color="tab:blue", label="policy (each seed)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title}: equity, commission {cost}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curve(ax: Any, figs: dict[str, Any], **kw: Any) -> None:
    days = pd.to_datetime(figs["daily"]["day_ms"], unit="ms", utc=True)
    ax.plot(days, np.exp(np.cumsum(figs["daily"]["log_return"])), **kw)
    import matplotlib.dates as mdates

    ax.xaxis.set_major_locator(mdates.MonthLocator())
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m"))


def plot_sharpe(
    results: list[dict[str, Any]], baselines: dict[int, Any], split: str, cost: str, path: Path, title: str
) -> None:
    """Per fold: the Sharpe of the seed-averaged policy with its bootstrap interval, buy & hold and SMA beside."""
    plt = _pyplot()
    folds = sorted(baselines)
    pts, los, his, hold, sma = [], [], [], [], []
    for i in folds:
        seeds = [_series([r["splits"][split][cost]["policy"]]) for r in results if r["fold"] == i]
        daily = pd.concat(seeds, axis=1).dropna().mean(axis=1).to_numpy()
        pts.append(_sharpe_ann(daily))
        lo, hi = bootstrap_ci(daily, _sharpe_ann, block=BLOCK_DAYS)
        los.append(lo)
        his.append(hi)
        hold.append(_sharpe_ann(np.asarray(baselines[i][cost]["buy_and_hold"]["daily"]["log_return"])))
        sma.append(_sharpe_ann(np.asarray(baselines[i][cost]["sma_1d_5d_long_only"]["daily"]["log_return"])))
    x = np.arange(len(folds))
    pts_a = np.asarray(pts, dtype=float)
    err = np.vstack([pts_a - np.asarray(los, dtype=float), np.asarray(his, dtype=float) - pts_a])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(folds)), 3.5))
    ax.errorbar(
        x, pts_a, yerr=np.nan_to_num(err), fmt="o", color="tab:blue", capsize=4, label="policy (seed mean, 95% CI)"
    )
    ax.scatter(x + 0.15, hold, marker="s", color="tab:orange", label="buy & hold")
    ax.scatter(x - 0.15, sma, marker="^", color="tab:green", label="SMA 1d/5d LO")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"fold {i}" for i in folds])
    ax.set_ylabel("Sharpe (daily, annualised)")
    ax.set_title(f"{title}: {split}, commission {cost}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
