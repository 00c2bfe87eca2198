"""Training throughput in environment steps per second (rollout + update), both schedules in one run.

    .venv/bin/python benchmarks/bench_train.py [--updates 22] [--batch 128] [--steps 288] [--sb3]

Default settings of `ritmo train` (B=128 episodes x L=288 steps per update), 2 torch threads, on the real
2024 training period. Schedules are interleaved cycle by cycle (11 updates each) so that both see the same
machine load; the ratio of the two is the figure to trust on a shared machine. With --sb3 (needs the
optional `bench` extra: `pip install -e '.[bench]'`), stable-baselines3 PPO with its default MlpPolicy runs
on the same observations (one environment, then eight) for comparison.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import write_figures

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bot.files.candles import load_candles  # noqa: E402
from strategies.candles import parse_utc_date_ms  # noqa: E402
from strategies.features import build_observations, compute_features, fit_standardizer  # noqa: E402
from strategies.policy import PolicyNet  # noqa: E402
from strategies.trainer import (  # noqa: E402
    TrainConfig,
    Trainer,
    episode_start_rows,
)

DATA = REPO.parent / "shared" / "data" / "binance_BTCUSDT_5m_2024.csv.gz"


def make_trainer(obs, candles, starts, schedule: str, batch: int, steps: int, **extra) -> Trainer:
    """A fresh trainer on the training period (extra: more TrainConfig fields, e.g. the objective)."""
    torch.manual_seed(0)
    return Trainer(
        model=PolicyNet(20),
        cfg=TrainConfig(schedule=schedule, episodes_per_update=batch, episode_steps=steps, seed=0, **extra),
        macro_x=torch.from_numpy(obs.macro),
        micro_x=torch.from_numpy(obs.micro),
        open_prices=torch.from_numpy(candles["open"].to_numpy(np.float64)),
        close_prices=torch.from_numpy(candles["close"].to_numpy(np.float64)),
        start_rows=torch.from_numpy(starts),
        generator=torch.Generator().manual_seed(0),
    )


def bench_sb3(obs, candles, starts, n_envs: int, timesteps: int) -> float:
    """Env steps/s of stable-baselines3 PPO (default MlpPolicy) on the same observations and accounting."""
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from strategies.accounting import Ledger

    opens = candles["open"].to_numpy(np.float64)
    closes = candles["close"].to_numpy(np.float64)
    obs_all = np.concatenate([obs.macro, obs.micro], axis=1)

    class TradingEnv(gym.Env):
        """One episode of 288 decisions with the project's Ledger; observation = macro + micro + position."""

        observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_all.shape[1] + 2,), np.float32)
        action_space = gym.spaces.Discrete(3)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.row = int(self.np_random.choice(starts))
            self.t = 0
            self.ledger = Ledger(cash_quote=1.0)
            return self._obs(), {}

        def _obs(self):
            p = float(self.ledger.position)
            return np.concatenate([obs_all[self.row + self.t], [p, 1 - abs(p)]]).astype(np.float32)

        def step(self, action):
            i = self.row + self.t
            e0 = self.ledger.equity(closes[i])
            self.ledger.apply_action(int(action), opens[i + 1], 0.001, 0.0, "long_short")
            reward = float(np.log(self.ledger.equity(closes[i + 1]) / e0))
            self.t += 1
            return self._obs(), reward, self.t >= 288, False, {}

    env = make_vec_env(TradingEnv, n_envs=n_envs, seed=0)
    model = PPO("MlpPolicy", env, verbose=0, seed=0, device="cpu")
    model.learn(total_timesteps=2048 * n_envs)  # warm-up: first rollout + update
    t = time.perf_counter()
    model.learn(total_timesteps=timesteps, reset_num_timesteps=False)
    return timesteps / (time.perf_counter() - t)


def main() -> None:
    """Print env steps/s for both schedules and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3, help="timed cycles of 11 updates per schedule")
    parser.add_argument("--batch", type=int, default=TrainConfig.episodes_per_update)
    parser.add_argument("--steps", type=int, default=TrainConfig.episode_steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--objective", default="card", help="training objective (card: the card's REINFORCE)")
    parser.add_argument("--decide-every", type=int, default=1, help="K: candles between decisions")
    parser.add_argument("--group-size", type=int, default=1, help="M rollouts per start (REINFORCE objectives)")
    parser.add_argument("--sb3", action="store_true", help="also measure stable-baselines3 PPO")
    parser.add_argument("--sb3-steps", type=int, default=20_480)
    parser.add_argument("--json", help="also write the figures to this JSON file (bench_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"machine    {platform.platform()}  cpus={torch.get_num_threads()} threads (of {_cpus()})")
    print(f"versions   python {platform.python_version()}  torch {torch.__version__}  numpy {np.__version__}")
    candles = load_candles(DATA)
    ts = candles["ts_ms"].to_numpy()
    feats = compute_features(candles)
    t0, t1 = np.searchsorted(ts, [parse_utc_date_ms("2024-01-01"), parse_utc_date_ms("2024-11-01")])
    obs = build_observations(feats, fit_standardizer(feats, slice(int(t0), int(t1))))
    starts = episode_start_rows(ts, obs.valid, int(t0), int(t1), args.steps, args.decide_every)
    print(
        f"settings   objective={args.objective} K={args.decide_every} M={args.group_size}  "
        f"B={args.batch} episodes x L={args.steps} decisions = {args.batch * args.steps:,} env steps/update"
    )
    extra = {"objective": args.objective, "decide_every": args.decide_every, "group_size": args.group_size}
    trainers = {
        s: make_trainer(obs, candles, starts, s, args.batch, args.steps, **extra) for s in ("asymmetric", "symmetric")
    }
    for tr in trainers.values():  # warm-up: allocator, first-call overheads
        tr.update()
        tr.rhythm.k = 0
    cycle_s: dict[str, list[float]] = {s: [] for s in trainers}
    steps_per_cycle = 11 * args.batch * args.steps
    for _ in range(args.cycles):
        for name, tr in trainers.items():
            t = time.perf_counter()
            for _ in range(11):
                tr.update()
            cycle_s[name].append(time.perf_counter() - t)
    print(f"== {args.objective} (rollout + update), one 11-update cycle = 1 MacroNet update (asymmetric)")
    for name, times in cycle_s.items():
        best, mean = min(times), float(np.mean(times))
        print(
            f"{name:11s} cycle {mean:6.2f} s (best {best:5.2f})   "
            f"{steps_per_cycle / mean:>10,.0f} env steps/s (best {steps_per_cycle / best:,.0f})"
        )
    ratio = float(np.mean(cycle_s["symmetric"])) / float(np.mean(cycle_s["asymmetric"]))
    print(f"ratio      symmetric / asymmetric wall time per cycle = {ratio:.3f}x  (the card claims 2.30x)")
    asym_rate = steps_per_cycle / float(np.mean(cycle_s["asymmetric"]))
    print(f"target     >= 150,000 env steps/s asymmetric: {'met' if asym_rate >= 150_000 else 'NOT met'}")

    figures: dict[str, float | None] = {
        "asymmetric_steps_s_mean": asym_rate,
        "asymmetric_steps_s_best": steps_per_cycle / min(cycle_s["asymmetric"]),
        "symmetric_over_asymmetric": ratio,
    }
    if args.sb3:
        try:
            for n_envs in (1, 8):
                rate = bench_sb3(obs, candles, starts, n_envs, args.sb3_steps)
                figures[f"sb3_ppo_{n_envs}_envs_steps_s"] = rate
                print(
                    f"sb3 PPO    {n_envs} env(s): {rate:>10,.0f} env steps/s   "
                    f"ritmo asymmetric / sb3 = {asym_rate / rate:,.0f}x"
                )
        except ImportError as exc:
            print(f"sb3 PPO    skipped: {exc} (pip install -e '.[bench]')")
    write_figures(args.json, figures)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
