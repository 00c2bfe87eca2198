"""Write a model card (markdown + two PNGs) for a trained checkpoint from its metrics file and fresh backtests.

    .venv/bin/python scripts/model_card.py checkpoints/default.pt --command "ritmo train ..."

Everything in the card is measured here: validation figures come from `ritmo backtest` of the checkpoint on
its validation period (greedy, and sampled with seeds 0, 1, 2), next to buy-and-hold and flat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.files.checkpoints import load_checkpoint  # noqa: E402

SEEDS = (0, 1, 2)


def run_backtest(ckpt: Path, data: str, date_from: str, date_to: str, extra: list[str]) -> dict:
    """`ritmo backtest --json` in a subprocess, exactly as a user would run it (data: space-separated files)."""
    cmd = [sys.executable, "-m", "bot", "backtest", "--checkpoint", str(ckpt), "--data", *data.split(),
           "--from", date_from, "--to", date_to, "--json", *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout)


def plot_training(metrics_path: Path, out_png: Path, title: str) -> dict:
    """Training curves: episode log return, entropy, action shares, validation score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates, validations = [], []
    for line in metrics_path.read_text().splitlines():
        d = json.loads(line)
        (updates if d["type"] == "update" else validations).append(d)
    k = np.array([u["k"] for u in updates])
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    ax = axes[0, 0]
    ax.plot(k, [u["mean_episode_log_return"] for u in updates], lw=0.6)
    ax.set_title("mean episode log return (training batch, net of fees)")
    ax = axes[0, 1]
    ax.plot(k, [u["entropy"] for u in updates], lw=0.8)
    ax.set_title("policy entropy (nats)")
    ax = axes[1, 0]
    if "action_shares" in updates[0]:
        for a in ("hold", "buy", "sell"):
            ax.plot(k, [u["action_shares"][a] for u in updates], lw=0.8, label=a)
        ax.legend()
        ax.set_title("action shares in rollouts")
    else:  # expected_pnl samples nothing: its metric is the expected turnover of the sampling policy
        ax.plot(k, [u["turnover_per_episode"] for u in updates], lw=0.8)
        ax.set_title("expected turnover per episode (equity fractions traded)")
    ax = axes[1, 1]
    if validations:
        vk = [v["k"] for v in validations]
        ax.plot(vk, [v["greedy"]["total_return"] for v in validations], marker="o", label="greedy")
        ax.plot(vk, [v["sampled"]["total_return_mean"] for v in validations], marker="o", label="sampled (3 seeds)")
        ax.plot(vk, [v["buy_and_hold"]["total_return"] for v in validations], ls="--", label="buy & hold")
        ax.axhline(0, color="grey", lw=0.8, label="flat")
        ax.legend()
    ax.set_title("validation total return (net of fees)")
    for a in axes.flat:
        a.set_xlabel("update k")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    last = updates[-1]
    return {"updates": len(updates), "final_entropy": last["entropy"], "final_action_shares": last.get("action_shares"),
            "final_turnover": last.get("turnover_per_episode"), "validations": len(validations)}  # fmt: skip


def validation_probs(bundle, data: str, v_from: str, v_to: str) -> dict:
    """How decided the policy is over the validation period: action probabilities from the flat state."""
    from bot.files.candles import load_candle_files
    from strategies.backtest import period_rows
    from strategies.bundle import period_probs
    from strategies.candles import parse_utc_date_ms
    from strategies.features import build_observations, compute_features

    candles = load_candle_files(data.split())
    obs = build_observations(compute_features(candles, bundle.spec), bundle.standardizer)
    i0, i1 = period_rows(candles["ts_ms"].to_numpy(), parse_utc_date_ms(v_from), parse_utc_date_ms(v_to))
    flat = period_probs(bundle, obs, i0, i1)[:, 1, :]  # position state 0 (flat)
    return {"mean": flat.mean(axis=0).tolist(), "max_trade": float(flat[:, 1:].sum(axis=1).max())}


def fmt_pct(x: float | None) -> str:
    """Percentage or n/a."""
    return "n/a" if x is None else f"{x:+.2%}"


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    """Number or n/a."""
    return "n/a" if x is None else format(x, spec)


def metrics_row(name: str, m: dict, days: float) -> str:
    """One markdown table row."""
    return (
        f"| {name} | {fmt_pct(m['total_return'])} | {fmt_num(m['sharpe'])} | {fmt_num(m['sortino'])} | "
        f"{m['max_drawdown']:.2%} | {m['n_trades']} | {m['n_trades'] / days:.1f} | {m['fees_quote']:,.2f} | "
        f"{m['share_long']:.1%} / {m['share_short']:.1%} / {m['share_flat']:.1%} |"
    )


def evaluation_section(path: Path) -> str:
    """The walk-forward evaluation of the checkpoint's configuration (results.json of `ritmo evaluate`)."""
    r = json.loads(path.read_text())
    h = r["headline"]
    split, cost = h["split"], str(h["commission"])
    pooled = r["pooled"][split][cost]
    pol, base = pooled["policy"], pooled["baselines"]
    t = h["targets"]
    rows = [
        "| strategy | return | Sharpe (daily, ann.) | 95% CI | max DD |",
        "|---|---|---|---|---|",
        f"| **this configuration** (mean of {len(pol['sharpe_per_seed'])} seeds) | {fmt_pct(pol['total_return'])} | "
        f"{fmt_num(pol['sharpe'])} | [{fmt_num(pol['sharpe_ci'][0])}, {fmt_num(pol['sharpe_ci'][1])}] | "
        f"{fmt_pct(pol['max_drawdown'])} |",
    ]
    for name in (
        "buy_and_hold",
        "sma_1d_5d_long_only",
        "sma_1d_5d_long_short",
        "sma_2d_8d_long_only",
        "flat",
        "random",
    ):
        b = base[name]
        rows.append(
            f"| {name} | {fmt_pct(b['total_return'])} | {fmt_num(b['sharpe'])} | "
            f"[{fmt_num(b['sharpe_ci'][0])}, {fmt_num(b['sharpe_ci'][1])}] | {fmt_pct(b['max_drawdown'])} |"
        )
    folds = r["folds"]
    trade_target = (
        f"every seed trades on every fold, 1/week .. 6/day (measured {h['trades_per_day_min']:.3f} .. "
        f"{h['trades_per_day_max']:.3f}/day, {h['units_never_traded']} runs never traded)"
    )
    return f"""## Walk-forward evaluation of this configuration ({split} folds, pooled, commission {cost})

`ritmo evaluate` retrained this configuration on each of {len(folds)} folds ({folds[0]["test"][0]} ..
{folds[-1]["test"][1]} tested, 3 months each) with {len(pol["sharpe_per_seed"])} seeds; the shipped file is one
more run of it on all data before its validation period. Targets of the issue, measured:

| target | met |
|---|---|
| {trade_target} | {t["trades_every_unit_in_range"]} |
| beats flat | {t["beats_flat"]} |
| Sharpe >= buy & hold | {t["sharpe_at_least_buy_and_hold"]} |
| Sharpe >= best SMA rule ({h["best_sma"]}) | {t["sharpe_at_least_best_sma"]} |
| max drawdown < buy & hold | {t["drawdown_below_buy_and_hold"]} |

{chr(10).join(rows)}

Trades/day {fmt_num(pol["trades_per_day"], ".3f")}, average holding {fmt_num(pol["avg_holding_hours"], ".1f")} h,
win rate {fmt_num(pol["win_rate"], ".1%")}, edge per trade {fmt_num(pol["edge_per_trade_bps"], ".1f")} bps against a
fee of {float(cost) * 1e4:.0f} bps; deflated Sharpe {fmt_num(pol["deflated_sharpe"], ".3f")} over {pol["n_trials"]}
trials.
The whole report, cost sweep and per-fold tables: `docs/evaluation.md`.
"""


def main() -> None:
    """Write CHECKPOINT.md, CHECKPOINT.training.png and CHECKPOINT.validation.png."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--command", required=True, help="the exact command that trained it")
    p.add_argument("--machine", default="", help="machine description for the card")
    p.add_argument("--notes", default="", help="extra markdown appended under Known limitations")
    p.add_argument("--verdict", default="", help="a plain-words summary placed first")
    p.add_argument("--shipped", choices=("last", "best"), default="last", help="which state of the run this file is")
    p.add_argument("--evaluation", type=Path, help="results.json of `ritmo evaluate` for this configuration")
    args = p.parse_args()
    ckpt: Path = args.checkpoint
    bundle = load_checkpoint(ckpt)
    meta = bundle.metadata
    data = meta["data"]
    v_from, v_to = meta["valid_period"][0][:10], meta["valid_period"][1][:10]
    stem = ckpt.with_suffix("")
    train_png = stem.with_name(stem.name + ".training.png")
    valid_png = stem.with_name(stem.name + ".validation.png")
    curves = plot_training(ckpt.with_suffix(".metrics.jsonl"), train_png, f"training curves: {ckpt.name}")

    greedy = run_backtest(ckpt, data, v_from, v_to, ["--greedy", "--plot", str(valid_png)])
    sampled = [run_backtest(ckpt, data, v_from, v_to, ["--seed", str(s)]) for s in SEEDS]
    days = greedy["candles"] / 288

    rows = [
        "| policy | total return | Sharpe | Sortino | max DD | trades | trades/day | fees | long / short / flat |",
        "|---|---|---|---|---|---|---|---|---|",
        metrics_row("policy, greedy", greedy["policy"], days),
        *[metrics_row(f"policy, sampled seed {s}", r["policy"], days) for s, r in zip(SEEDS, sampled, strict=True)],
        metrics_row("buy & hold", greedy["buy_and_hold"], days),
        metrics_row("flat", greedy["flat"], days),
    ]
    probs = validation_probs(bundle, data, v_from, v_to)
    rhythm = bundle.rhythm
    cfg = bundle.train_config
    objective = bundle.objective
    if curves["final_action_shares"]:
        sh = curves["final_action_shares"]
        end_state = (
            f"the rollouts' action shares were hold {sh['hold']:.1%}, buy {sh['buy']:.1%}, sell {sh['sell']:.1%}"
        )
    else:
        end_state = f"the expected turnover per training episode was {curves['final_turnover']:.2f} x equity"
    learner = (
        "REINFORCE (the card's objective)"
        if objective == "card"
        else f"the `{objective}` objective (strategies/objectives.py)"
    )
    shipped = (
        "the LAST state of the run (not the best-on-validation one), so the validation figures below are out "
        "of sample: the validation period chose nothing."
        if args.shipped == "last"
        else "the BEST state on the validation period (mean sampled log return over seeds 0, 1, 2), so the "
        "validation figures below chose this file and are not out of sample; the out-of-sample evidence is the "
        "walk-forward evaluation of its configuration."
    )
    evaluation = evaluation_section(args.evaluation) if args.evaluation else ""
    text = f"""# Model card: `{ckpt.name}`

Policy network of the architecture card (MacroNet 48,512 + MicroNet 5,984 + decision head 29,315 = 83,811
parameters), trained offline with {learner} under the `{rhythm["schedule"]}` schedule (MacroNet learns once
every {rhythm["macro_every"]} updates) in `{bundle.position_mode}` mode, deciding every {bundle.decide_every}
candles. Model version `{bundle.version()}`.

## Reproduce

```sh
{args.command}
```

Same code version (`{meta.get("code_version")}`), same machine kind and torch threads give the same weights
(training is seeded: initial weights, episode starts, sampling and dropout masks). This card was written by
`.venv/bin/python scripts/model_card.py {ckpt} --command "..."`.

## Data and periods

- data: `{data}` (real Binance BTC/USDT 5m candles)
- training period: {meta["train_period"][0]} .. {meta["train_period"][1]} (standardisation fitted here only)
- validation period: {meta["valid_period"][0]} .. {meta["valid_period"][1]}
- seed {meta["seed"]}; {rhythm["k"]} updates of {cfg["episodes_per_update"]} episodes x {cfg["episode_steps"]}
  decisions ({rhythm["macro_updates"]} MacroNet updates); objective `{objective}`, decision every
  {bundle.decide_every} candles, gamma {cfg["gamma"]}; commission {bundle.commission} per side (curriculum over
  {cfg.get("cost_curriculum_updates", 0)} updates); slippage {cfg["slippage_bps"]} bps; entropy bonus
  {cfg["entropy_coef"]}; gradient clip {cfg["grad_clip"]} (0 = off)
- training time: {meta["train_seconds"]:.0f} s of updates (torch {meta.get("torch")}) on
  {args.machine or meta.get("machine")}; the machine was shared with other work while it ran
- shipped: {shipped}

{evaluation}
## Validation ({v_from} .. {v_to}, {greedy["candles"]} candles, net of fees)

{chr(10).join(rows)}

Short borrow and funding costs are not modelled. Nothing is sold at the end: all are marked to market.
Reproduce a row with `ritmo backtest --checkpoint {ckpt} --data {data} --from {v_from} --to {v_to} --greedy`
(or `--seed S`).

![validation equity]({valid_png.name})

## Training curves

At the end of training {end_state}; policy entropy {curves["final_entropy"]:.4f} nats. Over the validation period,
from the flat state, the mean probabilities are HOLD {probs["mean"][0]:.6f}, BUY {probs["mean"][1]:.6f},
SELL {probs["mean"][2]:.6f}; the largest probability of a trading action (BUY or SELL) at any candle is
{probs["max_trade"]:.3g}.

![training curves]({train_png.name})

## Known limitations

- BTC/USDT spot 2021-2024 only; position is all-in (-1/0/+1 of equity); no sizing, no stop-loss; fills at
  the next 5-minute open; short borrow and funding are not modelled.
{args.notes}
"""
    if args.verdict:
        text = text.replace("## Reproduce", f"## Verdict\n\n{args.verdict}\n\n## Reproduce", 1)
    ckpt.with_suffix(".md").write_text(text)
    print(f"wrote {ckpt.with_suffix('.md')}, {train_png}, {valid_png}")


if __name__ == "__main__":
    main()
