"""The sigma grids and timesteps of diffusers' Wan samplers, rebuilt in torch from a scheduler config.

A Wan diffusers folder names its scheduler in `scheduler/scheduler_config.json`: UniPCMultistepScheduler with
prediction_type "flow_prediction" and use_flow_sigmas (Wan2.1), or FlowMatchEulerDiscreteScheduler. Our
negatives must be what that pipeline samples, so `FlowScheduler.schedule(steps)` reproduces, value for value
and dtype for dtype, the scheduler's `sigmas` (float32, steps + 1, last 0) and the `timesteps` the pipeline
feeds the transformer (diffusers 0.42):
- UniPC: sigma = linspace(1, 1/N, steps + 1)[:-1] in float64, shifted s' = k s / (1 + (k - 1) s), the first
  pulled 1e-6 below 1; timesteps = int64(N sigma) (truncated, so 999, not 999.999).
- FlowMatchEuler: the constructor shifts its 1000-point table once; set_timesteps spaces N sigma linearly
  from that table's max (1) to its (already shifted) min and shifts again (so shift applies twice at the
  low end: that is the pipeline's grid, reproduced as is); timesteps = float32 N sigma.
Configs these formulas do not cover (Karras/exponential/beta sigmas, dynamic shifting, thresholding,
epsilon/v prediction, ...) are refused with the key that differs, rather than sampled differently.

Why our own grids and not diffusers' scheduler objects at run time: the solver state machine stays short,
pure torch and readable beside flow.py, nothing depends on a scheduler object's hidden step counter, and the
tests pin us to the installed diffusers (tests/unit/data/test_negatives_diffusers.py runs both pipelines).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("unipc", "euler")
UNIPC_CLASS, EULER_CLASS = "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"
# config keys whose every other value changes the numbers: the value we reproduce
_UNIPC_FIXED = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "predict_x0": True,
                "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None, "solver_p": None}
_EULER_FIXED = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "stochastic_sampling": False}


@dataclass(frozen=True)
class Schedule:
    """sigmas [steps + 1] (the solver's grid) and timesteps [steps] (what the model is given)."""
    kind: str
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    unipc: "FlowScheduler | None" = None  # the UniPC options (order, bh1/bh2, ...)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def head(self, n: int) -> "Schedule":
        """The first n steps (a partial run, e.g. for timing)."""
        return Schedule(self.kind, self.sigmas[:n + 1], self.timesteps[:n], self.unipc)

    @classmethod
    def from_sigmas(cls, sigmas, kind: str = "unipc", num_train_timesteps: int = 1000) -> "Schedule":
        """A custom grid (last sigma 0); timesteps = N sigma as float, UniPC with Wan's options."""
        sig = sigmas if torch.is_tensor(sigmas) else torch.tensor(list(sigmas), dtype=torch.float32)
        return cls(kind, sig, sig[:-1] * num_train_timesteps, FlowScheduler() if kind == "unipc" else None)


@dataclass(frozen=True)
class FlowScheduler:
    """A diffusers flow scheduler as plain data (what the negatives record as their sampler)."""
    kind: str = "unipc"                 # "unipc" (UniPCMultistepScheduler) | "euler" (FlowMatchEulerDiscrete)
    shift: float = 5.0                  # Wan2.1's flow_shift (its diffusers folders say 3.0 or 5.0)
    num_train_timesteps: int = 1000
    solver_order: int = 2               # the rest: UniPC only
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = field(default_factory=tuple)
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"solver={self.kind!r} is not one of {KINDS}")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift} must be positive")
        if self.solver_type not in ("bh1", "bh2") or self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"solver_type={self.solver_type!r} (bh1|bh2), final_sigmas_type="
                             f"{self.final_sigmas_type!r} (zero|sigma_min)")
        if not 1 <= self.solver_order <= 3:
            raise ValueError(f"solver_order={self.solver_order} must be 1, 2 or 3")

    @classmethod
    def from_config(cls, cfg: dict, kind: str | None = None, shift: float | None = None) -> "FlowScheduler":
        """From a scheduler_config.json's contents; `kind`/`shift` (given flags) override its family and shift."""
        name = cfg.get("_class_name")
        if name not in (UNIPC_CLASS, EULER_CLASS):
            raise ValueError(f"scheduler {name!r} is not {UNIPC_CLASS} or {EULER_CLASS}: cannot reproduce it")
        fixed = _UNIPC_FIXED if name == UNIPC_CLASS else _EULER_FIXED
        bad = {k: cfg[k] for k, want in fixed.items()
               if k in cfg and cfg[k] != want and not (want is None and cfg[k] in (None, []))}
        if bad:
            raise ValueError(f"{name} with {bad} is not a grid this sampler reproduces (need "
                             f"{ {k: fixed[k] for k in bad} })")
        own_shift = cfg.get("flow_shift" if name == UNIPC_CLASS else "shift", 1.0)
        out = dict(kind="unipc" if name == UNIPC_CLASS else "euler", shift=float(own_shift),
                   num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
        if name == UNIPC_CLASS:
            out.update(solver_order=cfg.get("solver_order", 2), solver_type=cfg.get("solver_type", "bh2"),
                       lower_order_final=cfg.get("lower_order_final", True),
                       disable_corrector=tuple(cfg.get("disable_corrector") or ()),
                       final_sigmas_type=cfg.get("final_sigmas_type", "zero"))
        if kind is not None and kind != out["kind"]:  # another family: keep N and the shift only
            out = dict(kind=kind, shift=out["shift"], num_train_timesteps=out["num_train_timesteps"])
        if shift is not None:
            out["shift"] = float(shift)
        return cls(**out)

    @classmethod
    def read(cls, path: str | Path, kind: str | None = None, shift: float | None = None) -> "FlowScheduler":
        """From a Wan diffusers folder, its scheduler/ folder, or a scheduler_config.json."""
        path = Path(path)
        for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
            if candidate.is_file():
                return cls.from_config(json.loads(candidate.read_text()), kind, shift)
        raise ValueError(f"{path}: no scheduler/scheduler_config.json (want a Wan diffusers folder, its "
                         f"scheduler/ folder or the json itself)")

    def schedule(self, steps: int) -> Schedule:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        grid = self._unipc_grid(steps) if self.kind == "unipc" else self._euler_grid(steps)
        return Schedule(self.kind, *grid, self if self.kind == "unipc" else None)

    def _shifted(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _unipc_grid(self, steps: int):
        n = self.num_train_timesteps
        sig = self._shifted(_np_linspace(1.0, 1.0 / n, steps + 1)[:-1])
        if abs(sig[0].item() - 1) < 1e-6:  # diffusers keeps the first sigma off 1 (log SNR finite)
            sig[0] -= 1e-6
        timesteps = (sig * n).to(torch.int64)  # truncation, as numpy -> torch int64
        last = sig[-1:] if self.final_sigmas_type == "sigma_min" else torch.zeros(1, dtype=torch.float64)
        return torch.cat([sig, last]).to(torch.float32), timesteps

    def _euler_grid(self, steps: int):
        n = self.num_train_timesteps
        table = torch.tensor([1.0, float(n)], dtype=torch.float32) / n  # the ends of the constructor's table
        table = self._shifted(table)
        sigma_min, sigma_max = table[0].item(), table[1].item()
        sig = self._shifted(_np_linspace(sigma_max * n, sigma_min * n, steps) / n).to(torch.float32)
        return torch.cat([sig, torch.zeros(1)]), sig * n


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """Our former grid (t from 1 - 1/N to 0, then shifted): NOT diffusers'. Kept for callers that only time
    the sampler (experiments/gpu_check); negatives use FlowScheduler.schedule."""
    FlowScheduler(shift=shift).schedule(steps)  # validates
    t_max = 1.0 - 1.0 / 1000
    return [shift * t / (1 + (shift - 1) * t) for t in (t_max * (1 - i / steps) for i in range(steps + 1))]


def _np_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """float64 linspace with numpy's arithmetic (start + i * step, the end exact): the grids' last bits."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    out = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    out[-1] = stop
    return out
