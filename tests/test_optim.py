"""strategies.optim.Adam against torch.optim.Adam: the same parameters and state bit for bit after many real
policy-gradient steps on PolicyNet, state dicts that move both ways, and no torch._dynamo / sympy import."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from strategies.optim import Adam
from strategies.policy import PolicyNet
from strategies.trainer import policy_gradient_step
from tests.test_daemon import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
B, L, N_FEATURES = 4, 24, 20

Optimisers = tuple[Any, Any]  # (MacroNet's, MicroNet + head's), torch's or ours


def twin_models(seed: int = 5) -> tuple[PolicyNet, PolicyNet]:
    """Two PolicyNets with the same seeded weights."""
    torch.manual_seed(seed)
    a = PolicyNet(N_FEATURES).eval()
    return a, copy.deepcopy(a)


def rest_params(model: PolicyNet) -> list[torch.nn.Parameter]:
    """MicroNet + decision head, the second optimiser's parameters (as trainer and learner group them)."""
    return list(model.micro.parameters()) + list(model.head.parameters())


def torch_adams(model: PolicyNet, lr_macro: float = 1e-4, lr_rest: float = 5e-4) -> Optimisers:
    """The optimisers ritmo used before: torch.optim.Adam with default betas and eps."""
    return torch.optim.Adam(model.macro.parameters(), lr=lr_macro), torch.optim.Adam(rest_params(model), lr=lr_rest)


def our_adams(model: PolicyNet, lr_macro: float = 1e-4, lr_rest: float = 5e-4) -> Optimisers:
    """The same optimisers from strategies.optim."""
    return Adam(model.macro.parameters(), lr=lr_macro), Adam(rest_params(model), lr=lr_rest)


def step(model: PolicyNet, opts: Optimisers, k: int, *, learn_macro: bool, grad_clip: float = 0.0) -> None:
    """Update k: a REINFORCE step on seeded synthetic episodes through the trainer's own step function."""
    g = torch.Generator().manual_seed(1000 + k)
    # Advantages of varying scale (1e-3 .. 10) so that tiny and large moments both occur.
    scale = 10.0 ** (k % 5 - 3)
    policy_gradient_step(
        model,
        *opts,
        macro_x=torch.randn(B * L, 3 * N_FEATURES, generator=g),
        micro_x=torch.randn(B * L, 3 * N_FEATURES, generator=g),
        positions=torch.randint(-1, 2, (B, L), generator=g).float(),
        actions=torch.randint(0, 3, (B, L), generator=g),
        advantages=torch.randn(B, L, generator=g) * scale,
        learn_macro=learn_macro,
        entropy_coef=0.01,
        grad_clip=grad_clip,
        dropout_seed=k,
    )


def assert_same_weights(a: PolicyNet, b: PolicyNet) -> None:
    """Every parameter equal bit for bit."""
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two Adam state dicts equal: groups, state keys, tensors bit for bit with the same dtype and shape."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        assert st.keys() == b["state"][pid].keys()
        for name, x in st.items():
            y = b["state"][pid][name]
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (pid, name)


def assert_same_optimisers(a: Optimisers, b: Optimisers) -> None:
    """Both pairs' state dicts equal."""
    for x, y in zip(a, b, strict=True):
        assert_same_state(x.state_dict(), y.state_dict())


def run(models: tuple[PolicyNet, PolicyNet], opts: tuple[Optimisers, Optimisers], ks: range, **kw: Any) -> None:
    """Updates ks on both (model, optimisers) pairs under the 1:3 rhythm, asserting equality after each."""
    for k in ks:
        for model, pair in zip(models, opts, strict=True):
            step(model, pair, k, learn_macro=k % 3 == 0, **kw)
        assert_same_weights(*models)
        assert_same_optimisers(*opts)


# ---------------------------------------------------------------------------------------------------
# The arithmetic: bit for bit.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_many_steps_match_torch_bit_for_bit(grad_clip: float) -> None:
    """60 updates, MacroNet learning on one in three (its optimiser idle otherwise), with and without clipping."""
    ref, ours = twin_models()
    ref_opts, our_opts = torch_adams(ref), our_adams(ours)
    run((ref, ours), (ref_opts, our_opts), range(60), grad_clip=grad_clip)
    steps = {float(s["step"]) for s in our_opts[1].state_dict()["state"].values()}
    assert steps == {60.0}
    assert {float(s["step"]) for s in our_opts[0].state_dict()["state"].values()} == {20.0}


def test_learning_rate_changes_match_torch() -> None:
    """lr set through param_groups between steps (the online learner's and the tests' way) acts as in torch."""
    ref, ours = twin_models(6)
    ref_opts, our_opts = torch_adams(ref), our_adams(ours)
    for lr_macro, lr_rest, ks in ((1e-4, 5e-4, range(0, 10)), (3e-3, 1e-2, range(10, 20)), (1e-6, 0.0, range(20, 30))):
        for pair in (ref_opts, our_opts):
            pair[0].param_groups[0]["lr"] = lr_macro
            pair[1].param_groups[0]["lr"] = lr_rest
        run((ref, ours), (ref_opts, our_opts), ks)


def test_parameters_without_gradient_are_skipped_as_in_torch() -> None:
    """Stepping a group whose params got no gradient (MacroNet off the rhythm), or only some of them, changes
    neither those params nor their state: torch's Adam skips grad None, and so does ours."""
    ref, ours = twin_models(7)
    ref_opts, our_opts = torch_adams(ref), our_adams(ours)
    for k in range(12):
        for model, pair in ((ref, ref_opts), (ours, our_opts)):
            step(model, pair, k, learn_macro=k % 4 == 0)
            pair[0].step()  # grads are None unless MacroNet learnt this update: a no-op then
            model.zero_grad(set_to_none=False)
            params = rest_params(model)
            for i, p in enumerate(params):
                p.grad = None if i % 2 == 0 and (i + k) % 3 == 0 else torch.full_like(p, 1e-3 * (k + 1))
            pair[1].step()
        assert_same_weights(ref, ours)
        assert_same_optimisers(ref_opts, our_opts)
    # Some rest params have a lower step count than others: the skip really happened.
    assert len({float(s["step"]) for s in our_opts[1].state_dict()["state"].values()}) > 1


def test_zero_grad_matches_torch() -> None:
    """zero_grad(set_to_none=True) leaves None; set_to_none=False leaves zeros, detached."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p])
    p.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(3)) and not p.grad.requires_grad
    opt.zero_grad()
    assert p.grad is None


# ---------------------------------------------------------------------------------------------------
# State dicts: torch's exact format, both ways.
# ---------------------------------------------------------------------------------------------------


def through_file(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict as a checkpoint file gives it back (torch.save / torch.load with weights_only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_format_is_torchs() -> None:
    """Same keys, group entries, parameter indices and tensor dtypes as torch's Adam, step a float32 scalar."""
    ref, ours = twin_models(8)
    ref_opts, our_opts = torch_adams(ref), our_adams(ours)
    run((ref, ours), (ref_opts, our_opts), range(3))
    for x, y in zip(ref_opts, our_opts, strict=True):
        a, b = x.state_dict(), y.state_dict()
        assert list(a) == list(b) == ["state", "param_groups"]
        assert [list(g) for g in a["param_groups"]] == [list(g) for g in b["param_groups"]]
        for st in b["state"].values():
            assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and st["step"].device.type == "cpu"
    # Before any step the state is empty, as torch's.
    assert_same_state(torch_adams(ref)[1].state_dict(), our_adams(ours)[1].state_dict())


def test_torch_to_ours_to_torch_continues_bit_for_bit() -> None:
    """A torch checkpoint loads into ours and training continues identically; ours loads back into torch."""
    ref, ours = twin_models(9)
    ref_opts = torch_adams(ref)
    run((ref, ours), (ref_opts, torch_adams(ours)), range(7))
    # torch -> ours (through a checkpoint file, as bot/offline/fit.py resumes and the daemon starts).
    our_opts = our_adams(ours, lr_macro=0.5, lr_rest=0.5)  # hyperparameters must come from the saved groups
    for opt, src in zip(our_opts, ref_opts, strict=True):
        opt.load_state_dict(through_file(src.state_dict()))
    assert our_opts[0].param_groups[0]["lr"] == 1e-4 and our_opts[1].param_groups[0]["lr"] == 5e-4
    run((ref, ours), (ref_opts, our_opts), range(7, 20), grad_clip=1.0)
    # ours -> torch.
    back = torch_adams(ours, lr_macro=0.5, lr_rest=0.5)
    for opt, src in zip(back, our_opts, strict=True):
        opt.load_state_dict(through_file(src.state_dict()))
    run((ref, ours), (ref_opts, back), range(20, 30))


def test_load_state_dict_aliases_like_torch() -> None:
    """state_dict() hands out the live state (deep-copy for a snapshot) and load_state_dict adopts the given
    tensors, as torch: the learner's snapshot/restore relies on deepcopy, not on copies made here."""
    _, ours = twin_models(10)
    opt = our_adams(ours)[1]
    step(ours, (our_adams(ours)[0], opt), 0, learn_macro=False)
    snap = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(snap)
    assert opt.state_dict()["state"][0]["exp_avg"] is snap["state"][0]["exp_avg"]
    snap["param_groups"][0]["lr"] = 9.0  # groups are copied, as torch deep-copies them
    assert opt.param_groups[0]["lr"] == 5e-4


def test_rejects_what_it_does_not_reproduce() -> None:
    """weight_decay, amsgrad and torch-only switches in a loaded group fail loudly instead of differing."""
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError):
        Adam([p], weight_decay=0.1)
    with pytest.raises(ValueError):
        Adam([p], amsgrad=True)
    state = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], maximize=True).state_dict()
    with pytest.raises(ValueError):
        Adam([p]).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# Memory: the daemon's learner never imports torch._dynamo or sympy.
# ---------------------------------------------------------------------------------------------------

LEARNER_SCRIPT = """
import json, sys
from pathlib import Path
from bot.daemon.learner import OnlineLearner
from bot.files.checkpoints import load_checkpoint
from tests.test_online_objectives import episode
learner = OnlineLearner(load_checkpoint(Path(sys.argv[1])), checkpoint_dir=Path(sys.argv[2]), seed=3,
                        macro_every=2, keep=3)
statuses = [learner.learn(episode(k), k=k, macro_updates=0).status for k in range(3)]
learner._restore(learner._snapshot())
print(json.dumps({"statuses": statuses, "dynamo": "torch._dynamo" in sys.modules, "sympy": "sympy" in sys.modules}))
"""


def test_online_learner_does_not_import_dynamo_or_sympy(tmp_path: Path, candles_2024: pd.DataFrame) -> None:
    """Creating the learner, three updates (MacroNet learning on some), snapshot and restore, in a fresh
    interpreter: torch._dynamo (and sympy, ~73 MB together) stay unimported."""
    ckpt = make_checkpoint(tmp_path / "c.pt", candles_2024)
    out = subprocess.run(
        [sys.executable, "-c", LEARNER_SCRIPT, str(ckpt), str(tmp_path / "online")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["statuses"] == ["learned"] * 3
    assert not got["dynamo"] and not got["sympy"]
