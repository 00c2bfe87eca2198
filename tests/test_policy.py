"""The policy network is exactly the card's, and its sampling is reproducible per (seed, candle time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.policy import (
    PolicyNet,
    decision_uniforms,
    greedy_action,
    parameter_counts,
    probs_for_all_positions,
    sample_action,
)


def test_parameter_counts_match_the_card() -> None:
    counts = parameter_counts(PolicyNet(20))
    assert counts == {"macro": 48_512, "micro": 5_984, "head": 29_315, "total": 83_811}


@pytest.mark.parametrize("n_features", [5, 20, 33])
def test_parameter_counts_follow_the_formula(n_features: int) -> None:
    counts = parameter_counts(PolicyNet(n_features))
    assert counts["macro"] == (3 * n_features * 256 + 256) + (256 * 128 + 128)
    assert counts["micro"] == (3 * n_features * 64 + 64) + (64 * 32 + 32)
    assert counts["head"] == 29_315


def test_layers_are_the_cards() -> None:
    model = PolicyNet(20)
    kinds = [type(m).__name__ for m in model.macro.net]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    assert [type(m).__name__ for m in model.head.net] == [
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
    ]
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.head.net[0].in_features == 162


def test_forward_gives_probabilities_and_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    model = PolicyNet(20).eval()
    x, y = torch.randn(7, 60), torch.randn(7, 60)
    pos = torch.tensor([-1.0, 0, 1, 0, 1, -1, 0])
    p1 = model(x, y, pos)
    assert p1.shape == (7, 3)
    assert torch.allclose(p1.sum(-1), torch.ones(7, dtype=p1.dtype))
    assert torch.equal(p1, model(x, y, pos))
    model.train()
    assert not torch.equal(model(x, y, pos), model(x, y, pos)), "dropout must be active in train mode"


def test_probs_for_all_positions_equals_the_plain_forward() -> None:
    torch.manual_seed(1)
    model = PolicyNet(20)
    x, y = torch.randn(50, 60), torch.randn(50, 60)
    table = probs_for_all_positions(model, x, y, batch_size=16)
    assert table.shape == (50, 3, 3)
    assert model.training, "the helper must restore the training flag"
    model.eval()
    with torch.no_grad():
        for idx, p in enumerate((-1.0, 0.0, 1.0)):
            direct = model(x, y, torch.full((50,), p))
            torch.testing.assert_close(table[:, idx], direct, rtol=1e-6, atol=1e-7)


def test_decision_uniforms_depend_only_on_seed_and_time() -> None:
    ts = np.arange(1_704_067_200_000, 1_704_067_200_000 + 300_000 * 1000, 300_000, dtype=np.int64)
    u = decision_uniforms(7, ts)
    assert u.shape == (1000,) and (u >= 0).all() and (u < 1).all()
    # the same candle gives the same number whatever else is asked for with it
    assert decision_uniforms(7, ts[500]) == u[500]
    np.testing.assert_array_equal(decision_uniforms(7, ts[::-1])[::-1], u)
    assert not np.array_equal(decision_uniforms(8, ts), u)
    # roughly uniform: mean and a crude KS bound over 1000 draws
    assert abs(u.mean() - 0.5) < 0.05
    assert np.max(np.abs(np.sort(u) - (np.arange(1000) + 0.5) / 1000)) < 0.06


def test_sample_action_is_inverse_cdf() -> None:
    probs = [0.2, 0.5, 0.3]
    assert sample_action(probs, 0.0) == 0
    assert sample_action(probs, 0.1999) == 0
    assert sample_action(probs, 0.2) == 1
    assert sample_action(probs, 0.6999) == 1
    assert sample_action(probs, 0.7) == 2
    assert sample_action(probs, 0.99999) == 2
    u = decision_uniforms(3, np.arange(20_000, dtype=np.int64) * 300_000)
    counts = np.bincount([sample_action(probs, x) for x in u], minlength=3) / u.size
    np.testing.assert_allclose(counts, probs, atol=0.015)
    assert greedy_action(probs) == 1
