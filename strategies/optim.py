"""A small Adam, bit-identical to `torch.optim.Adam` as ritmo uses it, without importing `torch.optim`'s machinery.

Why: constructing (and stepping) `torch.optim.Adam` calls functions wrapped in `torch._disable_dynamo`, whose
first call imports `torch._dynamo` and with it sympy: ~73 MB of RSS and ~3 s for the daemon, which never compiles
anything. No argument or environment variable of torch avoids that import (`add_param_group`, `zero_grad`,
`state_dict`, `load_state_dict` and `step` all go through it), so ritmo carries its own optimiser.

Scope: float parameters on the CPU, default betas (0.9, 0.999) and eps 1e-8 (others accepted), weight_decay 0,
no amsgrad, no maximize, no capturable/differentiable/fused. Under these torch's `Adam.step` on the CPU runs
`torch.optim.adam._single_tensor_adam` (foreach kernels are only picked for CUDA-like devices); `step` below
mirrors its op order exactly, so parameters and state match torch's bit for bit (tests/test_optim.py).

`state_dict()` / `load_state_dict()` use torch's exact format, so checkpoints move both ways:
    {"state": {int: {"step": tensor(float32 scalar), "exp_avg": (like p), "exp_avg_sq": (like p)}},
     "param_groups": [{"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                       "differentiable", "fused", "decoupled_weight_decay", "params": [int, ...]}]}
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

# The hyperparameter keys of torch's Adam param groups, in its order, with torch's defaults.
_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": False,
}
# Settings whose non-default values would need code paths this Adam does not have.
_UNSUPPORTED: dict[str, Any] = {
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": (None, False),
    "capturable": False,
    "differentiable": False,
    "fused": (None, False),
    "decoupled_weight_decay": False,
}


def _check_supported(group: dict[str, Any]) -> None:
    """Raise if a group asks for a feature whose arithmetic this Adam does not reproduce."""
    for key, allowed in _UNSUPPORTED.items():
        ok = group[key] in allowed if isinstance(allowed, tuple) else group[key] == allowed
        if not ok:
            raise ValueError(f"strategies.optim.Adam does not support {key}={group[key]!r}")
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if isinstance(lr, torch.Tensor) or isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
        raise ValueError("strategies.optim.Adam takes lr and betas as Python floats")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"Invalid beta parameters: {group['betas']}")


class Adam:
    """Adam over CPU float parameters; same arithmetic, state and state_dict format as `torch.optim.Adam`."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
    ) -> None:
        self.defaults: dict[str, Any] = {
            **_DEFAULTS,
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
        }
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Append a group {"params": [...], optional hyperparameters}; missing ones take the defaults."""
        params = group["params"]
        group = {**group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        _check_supported(group)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in group["params"]:
            if not isinstance(p, torch.Tensor) or not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if id(p) in seen:
                raise ValueError("some parameters appear in more than one parameter group")
            seen.add(id(p))
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of all parameters: to None (the default), or to zeros in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    # As torch: a gradient that is part of a graph is cut from it before zeroing.
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient; parameters whose grad is None are skipped
        (their state and step count stay as they are), as in torch."""
        for group in self.param_groups:
            _check_supported(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, p.grad, group)

    def _step_param(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """`_single_tensor_adam`'s body for one parameter (non-capturable, float lr and betas), op for op."""
        if grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        if torch.is_complex(param):
            raise ValueError("strategies.optim.Adam does not support complex parameters")
        state = self.state.setdefault(param, {})
        if len(state) == 0:
            # torch keeps `step` as a float32 scalar on the CPU when neither capturable nor fused.
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]

        step_t += 1
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Python-float bias corrections from the float32 step count, exactly as torch computes them.
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """torch's format: state keyed by the parameter's index over all groups, groups with index lists.

        As torch's, the per-parameter state dicts and tensors are the optimiser's own (not copies): deep-copy
        the result to keep a snapshot."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {index[id(p)]: s for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict()` (this class's or torch's Adam's) returned, matching parameters by position.

        As torch: hyperparameters come from the saved groups; state tensors are moved to each parameter's
        dtype and device (`step` kept as saved), which, when they already match, shares them with the dict."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups, strict=True)):
            raise ValueError("loaded state dict has a parameter group that doesn't match the size of optimizer's group")
        id_map = {
            i: p
            for s, g in zip(saved_groups, self.param_groups, strict=True)
            for i, p in zip(s["params"], g["params"], strict=True)
        }
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            # torch deep-copies the saved groups, so later edits of the dict (or of our lr) do not leak across.
            new_group = {k: v for k, v in copy.deepcopy(saved).items() if k != "params"}
            for key, value in _DEFAULTS.items():
                new_group.setdefault(key, value)
            new_group["params"] = group["params"]
            _check_supported(new_group)
            new_groups.append(new_group)
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for i, s in state_dict["state"].items():
            if i not in id_map:
                raise ValueError(f"loaded state dict has state for parameter {i}, which no group holds")
            param = id_map[i]
            state[param] = {key: _cast_state(param, key, value) for key, value in s.items()}
        self.param_groups = new_groups
        self.state = state


def _cast_state(param: torch.Tensor, key: str, value: Any) -> Any:
    """torch's `_process_value_according_to_param_policy` for a non-capturable, non-fused group."""
    if not isinstance(value, torch.Tensor):
        # Very old checkpoints stored the step as a number; torch's __setstate__ makes it a float32 tensor.
        if key == "step":
            return torch.tensor(float(value), dtype=torch.float32)
        return value
    if key == "step":
        return value
    if param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)
