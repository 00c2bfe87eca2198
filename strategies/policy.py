"""The policy network of the architecture card (docs/design.md §4) and reproducible action sampling.

MacroNet reads the 492-candle window aggregate, MicroNet the 60-candle one; the decision head reads
their embeddings plus the position and the cash ratio and outputs HOLD/BUY/SELL probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

N_ACTIONS = 3
MACRO_EMBED = 128
MICRO_EMBED = 32
DROPOUT = 0.2
PART_NAMES = ("macro", "micro", "head")
POSITION_STATES = (-1.0, 0.0, 1.0)  # the position axis of the all-positions tables is position + 1


class _MaskedScale(torch.autograd.Function):
    """y = x * mask (mask already scaled); the backward multiplies by the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class Dropout(nn.Dropout):
    """`torch.nn.Dropout` with a mask drawn from 16-bit random integers, about 3x cheaper on the CPU.

    torch's Bernoulli sampler costs ~2 ns per element and dominated the training update. Here each
    element keeps with probability round((1-p) * 65536) / 65536 (0.80000305 for p = 0.2) and kept values
    are scaled by the inverse of that probability, so the expectation is preserved exactly. Eval mode is
    the identity, as for torch's Dropout. Random numbers come from torch's global generator.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity in eval mode; x * mask / keep_prob in train mode. Shape unchanged."""
        if not self.training or self.p == 0.0:
            return x
        keep = round((1.0 - self.p) * 65536)
        # 4 int16 numbers per int64 draw: uniform over [-32768, 32767]
        bits = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        r = bits.view(torch.int16)[: x.numel()].view(x.shape)
        mask = (r < keep - 32768).to(x.dtype) * (65536.0 / keep)
        return _MaskedScale.apply(x, mask)


class _Encoder(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear -> ReLU: (batch, 3 * n_features) -> (batch, embed)."""

    def __init__(self, n_features: int, hidden: int, embed: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * n_features, hidden),
            nn.ReLU(inplace=True),
            Dropout(DROPOUT),
            nn.Linear(hidden, embed),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 3 * n_features) -> (batch, embed)."""
        return self.net(x)


class MacroNet(_Encoder):
    """Long-horizon encoder: (batch, 3 * n_features) -> (batch, 128), hidden width 256."""

    def __init__(self, n_features: int) -> None:
        super().__init__(n_features, 256, MACRO_EMBED)


class MicroNet(_Encoder):
    """Short-horizon encoder: (batch, 3 * n_features) -> (batch, 32), hidden width 64."""

    def __init__(self, n_features: int) -> None:
        super().__init__(n_features, 64, MICRO_EMBED)


class DecisionHead(nn.Module):
    """concat(macro 128, micro 32, position 1, cash ratio 1) = 162 -> logits (batch, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(MACRO_EMBED + MICRO_EMBED + 2, 128),
            nn.ReLU(inplace=True),
            Dropout(DROPOUT),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            Dropout(DROPOUT),
            nn.Linear(64, N_ACTIONS),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, 162) -> logits (batch, 3); softmax of them is the action distribution."""
        return self.net(z)


class PolicyNet(nn.Module):
    """MacroNet + MicroNet + decision head; N = 20 gives 83,811 parameters."""

    def __init__(self, n_features: int = 20) -> None:
        super().__init__()
        self.n_features = n_features
        self.macro = MacroNet(n_features)
        self.micro = MicroNet(n_features)
        self.head = DecisionHead()

    def head_logits(self, macro_emb: torch.Tensor, micro_emb: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits (batch, 3) from embeddings (batch, 128), (batch, 32) and position (batch,)."""
        pos = position.to(macro_emb.dtype).unsqueeze(-1)
        z = torch.cat([macro_emb, micro_emb, pos, 1.0 - pos.abs()], dim=-1)
        return self.head(z)

    def forward(self, macro_x: torch.Tensor, micro_x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Action probabilities (batch, 3) from (batch, 3N), (batch, 3N) and position (batch,)."""
        logits = self.head_logits(self.macro(macro_x), self.micro(micro_x), position)
        return torch.softmax(logits, dim=-1)


def parameter_counts(model: PolicyNet) -> dict[str, int]:
    """Trainable parameters per part and in total."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in PART_NAMES}
    counts["total"] = sum(counts.values())
    return counts


def head_logits_all_positions(model: PolicyNet, macro_emb: torch.Tensor, micro_emb: torch.Tensor) -> torch.Tensor:
    """Logits (n, 3 positions, 3 actions) for the position states -1, 0, +1 from embeddings (n, 128), (n, 32).

    The head's first layer is linear in (embeddings, position, cash ratio), so its position-independent
    part is computed once and only the two position columns differ between the three states.
    Follows the module's train/eval mode (dropout) like the plain forward.
    """
    first = model.head.net[0]
    n_emb = MACRO_EMBED + MICRO_EMBED
    pre = torch.nn.functional.linear(torch.cat([macro_emb, micro_emb], dim=-1), first.weight[:, :n_emb], first.bias)
    w_pos, w_cash = first.weight[:, n_emb], first.weight[:, n_emb + 1]
    h = torch.stack([pre + p * w_pos + (1.0 - abs(p)) * w_cash for p in POSITION_STATES], dim=1)
    return model.head.net[1:](h)


@torch.no_grad()
def probs_for_all_positions(
    model: PolicyNet, macro_x: torch.Tensor, micro_x: torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    """Eval-mode probabilities for every position state: (n, 3N) x2 -> (n, 3 positions, 3 actions).

    The encoders do not depend on the position, which takes only the values -1, 0, +1; so a whole
    period can be evaluated in batches and a sequential policy run then only indexes this table.
    Index the position axis with `position + 1`. Batches of 4096 rows keep each layer's activations
    (4 MB for the 256-wide one) in cache: a year of rows ran ~2x faster on one thread than in batches of
    65536, and the activations take a few MB instead of hundreds.
    """
    # Switching modes walks every submodule (~0.7 ms): skip it when the model is in eval mode already (the
    # daemon's acting model, every tick), where eval() and train(False) would change nothing.
    switch = any(m.training for m in model.modules())
    was_training = model.training
    if switch:
        model.eval()
    out = []
    try:
        for lo in range(0, macro_x.shape[0], batch_size):
            m = model.macro(macro_x[lo : lo + batch_size])
            u = model.micro(micro_x[lo : lo + batch_size])
            out.append(torch.softmax(head_logits_all_positions(model, m, u), dim=-1))
    finally:
        if switch:
            model.train(was_training)
    return torch.cat(out, dim=0) if out else torch.empty(0, 3, N_ACTIONS)


# --- reproducible sampling ------------------------------------------------------------------------
# A decision's random number depends only on (seed, candle time), so a restart, a replay and a
# backtest agree whatever ran before. SplitMix64 is a well-tested 64-bit mixer that vectorises in numpy.

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def decision_uniforms(seed: int, ts_ms: np.ndarray | int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per candle open time, from (seed, ts_ms) only: shape of ts_ms."""
    ts = np.asarray(ts_ms, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(ts.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
        bits = _splitmix64(key ^ ts)
    # top 53 bits -> a double in [0, 1)
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_action(probs: np.ndarray | list[float], u: float) -> int:
    """Inverse-CDF sample of one action from probabilities (3,) and a uniform u in [0, 1)."""
    c0 = float(probs[0])
    if u < c0:
        return 0
    if u < c0 + float(probs[1]):
        return 1
    return 2


def greedy_action(probs: np.ndarray | list[float]) -> int:
    """The most probable action (ties go to the lower index: HOLD before BUY before SELL)."""
    return int(np.argmax(np.asarray(probs)))
