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

from bot.checkpoints import load_checkpoint  # noqa: E402

SEEDS = (0, 1, 2)


def run_backtest(ckpt: Path, data: str, date_from: str, date_to: str, extra: list[str]) -> dict:
    """`ritmo backtest --json` in a subprocess, exactly as a user would run it."""
    cmd = [sys.executable, "-m", "bot", "backtest", "--checkpoint", str(ckpt), "--data", data,
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
    for a in ("hold", "buy", "sell"):
        ax.plot(k, [u["action_shares"][a] for u in updates], lw=0.8, label=a)
    ax.legend()
    ax.set_title("action shares in rollouts")
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
    return {"updates": len(updates), "final_entropy": last["entropy"], "final_action_shares": last["action_shares"],
            "validations": len(validations)}  # fmt: skip


def validation_probs(bundle, data: str, v_from: str, v_to: str) -> dict:
    """How decided the policy is over the validation period: action probabilities from the flat state."""
    from bot.backtesting import period_probs
    from bot.candle_files import load_candles
    from strategies.backtest import period_rows
    from strategies.candles import parse_utc_date_ms
    from strategies.features import build_observations, compute_features

    candles = load_candles(data)
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


def main() -> None:
    """Write CHECKPOINT.md, CHECKPOINT.training.png and CHECKPOINT.validation.png."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--command", required=True, help="the exact command that trained it")
    p.add_argument("--machine", default="", help="machine description for the card")
    p.add_argument("--notes", default="", help="extra markdown appended under Known limitations")
    p.add_argument("--verdict", default="", help="a plain-words summary placed first")
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
    shares = curves["final_action_shares"]
    text = f"""# Model card: `{ckpt.name}`

Policy network of the architecture card (MacroNet 48,512 + MicroNet 5,984 + decision head 29,315 = 83,811
parameters), trained offline with REINFORCE under the `{rhythm["schedule"]}` schedule (MacroNet learns once
every {rhythm["macro_every"]} updates) in `{bundle.position_mode}` mode. Model version `{bundle.version()}`.

## Reproduce

```sh
{args.command}
```

Same code version (`{meta.get("code_version")}`), same machine kind and 2 torch threads give the same weights
(training is seeded: initial weights, episode starts, sampling and dropout masks; tested in
`tests/test_training_cli.py`). This card was written by
`.venv/bin/python scripts/model_card.py {ckpt} --command "..."`.

## Data and periods

- data: `{data}` (real Binance BTC/USDT 5m candles)
- training period: {meta["train_period"][0]} .. {meta["train_period"][1]} (standardisation fitted here only)
- validation period: {meta["valid_period"][0]} .. {meta["valid_period"][1]}
- seed {meta["seed"]}; {rhythm["k"]} updates of {cfg["episodes_per_update"]} episodes x {cfg["episode_steps"]} steps
  ({rhythm["macro_updates"]} MacroNet updates); commission {bundle.commission} per side; slippage
  {cfg["slippage_bps"]} bps; entropy bonus {cfg["entropy_coef"]}; gradient clip {cfg["grad_clip"]} (0 = off)
- training time: {meta["train_seconds"]:.0f} s of updates (torch {meta.get("torch")}) on
  {args.machine or meta.get("machine")}; the machine was shared with other work while it ran
- shipped: the LAST state of the run (not the best-on-validation one, `{ckpt.with_suffix(".best.pt").name}`),
  so the validation figures below are out of sample: the validation period chose nothing.

## Validation ({v_from} .. {v_to}, {greedy["candles"]} candles, net of fees)

{chr(10).join(rows)}

Short borrow and funding costs are not modelled. Nothing is sold at the end: all are marked to market.
Reproduce a row with `ritmo backtest --checkpoint {ckpt} --data {data} --from {v_from} --to {v_to} --greedy`
(or `--seed S`).

![validation equity]({valid_png.name})

## Training curves

At the end of training the rollouts' action shares were hold {shares["hold"]:.1%}, buy {shares["buy"]:.1%},
sell {shares["sell"]:.1%}; policy entropy {curves["final_entropy"]:.4f} nats. Over the validation period, from
the flat state, the mean probabilities are HOLD {probs["mean"][0]:.6f}, BUY {probs["mean"][1]:.6f},
SELL {probs["mean"][2]:.6f}; the largest probability of a trading action (BUY or SELL) at any candle is
{probs["max_trade"]:.3g}.

![training curves]({train_png.name})

## Known limitations

- REINFORCE with per-step log-return rewards and a 0.1% commission, started flat, learns first that trading
  costs fees; see the curves above for how far this run got beyond that.
- One year of one market (BTC/USDT spot, 2024, a strong bull year); no walk-forward, no regime test.
- Position is all-in (-1/0/+1 of equity); no sizing, no stop-loss; fills are at the next 5-minute open.
{args.notes}
"""
    if args.verdict:
        text = text.replace("## Reproduce", f"## Verdict\n\n{args.verdict}\n\n## Reproduce", 1)
    ckpt.with_suffix(".md").write_text(text)
    print(f"wrote {ckpt.with_suffix('.md')}, {train_png}, {valid_png}")


if __name__ == "__main__":
    main()
