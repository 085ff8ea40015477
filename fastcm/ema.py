"""Exponential moving averages of a parameter set for K profiles at once, in one fused pass.

    ema = fastcm.ema.EMA(net.parameters(), [fastcm.ema.power(0.05), fastcm.ema.power(0.10),
                                           fastcm.ema.constant(0.9999)])
    for step in ...:
        optimizer.step()
        ema.update()                      # one Triton launch per parameter dtype on CUDA
    ema.copy_to(ema_net.parameters(), 0)  # profile 0's average into another copy of the model

Profiles (β_k(t) at update t = 1, 2, …; shadow_k ← β·shadow_k + (1 − β)·θ):
  power(σ_rel)        EDM2's power-function EMA, β = (1 − 1/t)^(γ+1), γ from σ_rel (Karras et al. 2024)
  constant(decay)     β = decay (iCT's model EMA: 0.99993 for CIFAR-10, Song & Dhariwal 2023)
  halflife(h, batch)  EDM's EMA with half-life h samples and ramp-up (Karras et al. 2022)
  ct_target(μ0, s0, s1, total_steps)  the CT target-network schedule of Consistency Models (Song et
                      al. 2023); μ0 = 0 is iCT's choice (no target EMA)
Snapshots of power profiles (EMA.snapshot) feed posthoc_reconstruct, EDM2's post-hoc EMA: the
average of any σ_rel, rebuilt after training from stored averages of other σ_rel and times.
The formulas, and the inner products of power profiles the reconstruction solves with, are in
fastcm/reference/ema.py.
"""

import dataclasses
import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ._backend import select_backend
from ._library import on_tensors_device
from .reference import ema as reference
from .reference.ema import MAX_SIGMA_REL, gamma_to_sigma_rel, sigma_rel_to_gamma

_OP = "ema"
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Profile:
    """One EMA profile: `kind` and its arguments; beta(t) is its decay at update t ≥ 1."""

    kind: str
    args: tuple

    def beta(self, step: int) -> float:
        return _BETAS[self.kind](step, *self.args)

    @property
    def gamma(self) -> Optional[float]:
        """The power-function exponent γ (power profiles only, else None)."""
        return self.args[0] if self.kind == "power" else None


_BETAS = {
    "power": reference.power_beta,
    "constant": reference.constant_beta,
    "halflife": reference.halflife_beta,
    "ct_target": reference.ct_target_beta,
}


def _error(message: str) -> ValueError:
    return ValueError(f"fastcm.{_OP}: {message}")


def power(sigma_rel: float) -> Profile:
    """EDM2's power-function EMA of relative width σ_rel ∈ (0, 0.3003]: β(t) = (1 − 1/t)^(γ+1)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise _error(
            f"power: sigma_rel={sigma_rel!r} is not supported; expected a number in "
            f"(0, {MAX_SIGMA_REL:.4f}] (the widest power profile)"
        )
    return Profile("power", (sigma_rel_to_gamma(float(sigma_rel)),))


def power_from_gamma(gamma: float) -> Profile:
    """EDM2's power-function EMA given its exponent γ > −1 directly."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > -1 or not math.isfinite(gamma):
        raise _error(f"power_from_gamma: gamma={gamma!r} is not supported; expected a finite number > -1")
    return Profile("power", (float(gamma),))


def constant(decay: float) -> Profile:
    """β = decay ∈ [0, 1) at every update (the classic EMA; 0 copies the parameters)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise _error(f"constant: decay={decay!r} is not supported; expected a number in [0, 1)")
    return Profile("constant", (float(decay),))


def halflife(halflife_samples: float, batch: int, rampup_ratio: Optional[float] = 0.05) -> Profile:
    """EDM's EMA: β = 0.5^(batch / h), h = min(halflife_samples, rampup_ratio·samples seen so far)
    (no ramp-up with rampup_ratio=None)."""
    if not halflife_samples > 0 or isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise _error(f"halflife: halflife_samples={halflife_samples!r} must be > 0 and batch={batch!r} an int >= 1")
    if rampup_ratio is not None and not rampup_ratio > 0:
        raise _error(f"halflife: rampup_ratio={rampup_ratio!r} is not supported; expected a number > 0 or None")
    return Profile("halflife", (int(batch), float(halflife_samples), rampup_ratio))


def ct_target(mu0: float, s0: int, s1: int, total_steps: int) -> Profile:
    """The CT target EMA μ(k) = exp(s0·ln μ0 / N(k)) with CT's discretisation curriculum N(k)."""
    if not 0 <= mu0 < 1:
        raise _error(f"ct_target: mu0={mu0!r} is not supported; expected a number in [0, 1)")
    for name, value in (("s0", s0), ("s1", s1), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _error(f"ct_target: {name}={value!r} is not supported; expected an int >= 1")
    return Profile("ct_target", (int(total_steps), float(mu0), int(s0), int(s1)))


class _DtypeGroup:
    """The launch tables of the parameters of one dtype (see kernels/ema.py)."""

    def __init__(self, indices: List[int], params: List[torch.Tensor], offsets: List[int], block: int):
        from .kernels.ema import chunk_table

        device = params[indices[0]].device
        numels = torch.tensor([params[j].numel() for j in indices], dtype=torch.int64)
        self.indices = indices
        self.block = block
        self.addresses = [params[j].data_ptr() for j in indices]
        self.dtype = params[indices[0]].dtype
        chunk_params, chunk_starts = chunk_table(numels, block)
        self.tables = [
            t.to(device)
            for t in (
                torch.tensor(self.addresses, dtype=torch.int64),
                numels,
                torch.tensor([offsets[j] for j in indices], dtype=torch.int64),
                chunk_params,
                chunk_starts,
            )
        ]


class EMA:
    """K exponential moving averages (float32 shadows) of a list of parameters.

    parameters: tensors (nn.Parameters) of float32, bfloat16 or float16, contiguous, all on one
        device. The EMA keeps references to them: update() reads their current values.
    profiles: a sequence of K Profile (power, constant, halflife, ct_target).
    Shadows start equal to the parameters (rounded to float32). update() advances every profile by
    one step: on CUDA one Triton launch per parameter dtype reads each parameter once and updates
    its K shadows (FASTCM_BACKEND=reference: the float64 reference, per profile and parameter).
    Not differentiable (it runs under no_grad, like an optimizer step) and not traced by
    torch.compile (call it outside the compiled region).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], profiles: Sequence[Profile]):
        self.params = [p for p in parameters]
        self.profiles = list(profiles)
        if not self.params:
            raise _error("parameters is empty; expected at least one tensor")
        if not self.profiles or not all(isinstance(p, Profile) for p in self.profiles):
            raise _error(
                f"profiles={profiles!r} is not supported; expected a non-empty sequence of "
                f"fastcm.ema profiles (power, constant, halflife, ct_target)"
            )
        device = self.params[0].device
        for j, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor) or p.dtype not in PARAM_DTYPES:
                raise TypeError(
                    f"fastcm.{_OP}: parameters[{j}] must be a float32, bfloat16 or float16 tensor, got "
                    f"{getattr(p, 'dtype', type(p).__name__)}"
                )
            if p.device != device:
                raise _error(
                    f"parameters[{j}] is on {p.device} but parameters[0] is on {device}; all must be on one device"
                )
            if not p.is_contiguous():
                raise _error(
                    f"parameters[{j}] (shape {tuple(p.shape)}) is not contiguous; the EMA reads "
                    f"parameters in place, so they must be contiguous"
                )
        numels = [p.numel() for p in self.params]
        self.offsets = [sum(numels[:j]) for j in range(len(numels))]
        total = sum(numels)
        self.shadow = torch.empty((len(self.profiles), total), dtype=torch.float32, device=device)
        for k in range(len(self.profiles)):
            for view, p in zip(self.shadows(k), self.params):
                view.copy_(p.detach())
        self.step = 0
        self._groups: Dict[torch.dtype, _DtypeGroup] = {}

    def shadows(self, profile: int) -> List[torch.Tensor]:
        """Profile `profile`'s averages: float32 views into the shadow buffer, shaped like the parameters."""
        row = self.shadow[profile]
        return [row[o : o + p.numel()].view(p.shape) for o, p in zip(self.offsets, self.params)]

    def betas(self, step: int) -> List[float]:
        return [profile.beta(step) for profile in self.profiles]

    def _group(self, dtype: torch.dtype, block: int) -> _DtypeGroup:
        group = self._groups.get(dtype)
        # A parameter whose storage was replaced (p.data = …) moved: rebuild the address table.
        if (
            group is None
            or group.block != block
            or any(self.params[j].data_ptr() != a for j, a in zip(group.indices, group.addresses))
        ):
            indices = [j for j, p in enumerate(self.params) if p.dtype == dtype]
            group = self._groups[dtype] = _DtypeGroup(indices, self.params, self.offsets, block)
        return group

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of every profile: shadow_k ← shadow_k + (1 − β_k(t))·(θ − shadow_k), t = step + 1."""
        self.step += 1
        betas = self.betas(self.step)
        backend = select_backend(_OP, self.shadow.device)
        if backend == "reference":
            reference.ema_update([self.shadows(k) for k in range(len(self.profiles))], self.params, betas)
            return
        from .kernels import ema as kernels

        weights = torch.tensor([1.0 - b for b in betas], dtype=torch.float32).to(self.shadow.device, non_blocking=True)
        launch = on_tensors_device(kernels.ema_update_)
        for dtype in PARAM_DTYPES:
            if any(p.dtype == dtype for p in self.params):
                group = self._group(dtype, kernels.BLOCK)
                launch(*group.tables, self.shadow, weights, dtype, group.block)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor], profile: int = 0) -> None:
        """Copy profile `profile`'s averages into `parameters` (same shapes; cast to their dtype)."""
        targets = list(parameters)
        if len(targets) != len(self.params):
            raise _error(f"copy_to: got {len(targets)} parameters, expected {len(self.params)}")
        for target, view in zip(targets, self.shadows(profile)):
            target.copy_(view)

    def snapshot(self) -> List[dict]:
        """Copies of the power profiles' averages now, for posthoc_reconstruct: one dict per power
        profile, {"step": t, "gamma": γ, "sigma_rel": σ_rel, "params": [float32 tensors]} (on the CPU)."""
        return [
            {
                "step": self.step,
                "gamma": profile.gamma,
                "sigma_rel": gamma_to_sigma_rel(profile.gamma),
                "params": [view.detach().cpu().clone() for view in self.shadows(k)],
            }
            for k, profile in enumerate(self.profiles)
            if profile.kind == "power"
        ]

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "profiles": [(p.kind, p.args) for p in self.profiles],
            "numels": [p.numel() for p in self.params],
            "shadow": self.shadow,
        }

    def load_state_dict(self, state: dict) -> None:
        profiles = [Profile(kind, tuple(args)) for kind, args in state["profiles"]]
        if profiles != self.profiles:
            raise _error(f"load_state_dict: the saved profiles {profiles} differ from this EMA's {self.profiles}")
        if list(state["numels"]) != [p.numel() for p in self.params]:
            raise _error(
                f"load_state_dict: the saved parameter sizes {list(state['numels'])} differ from this "
                f"EMA's {[p.numel() for p in self.params]}"
            )
        self.shadow.copy_(state["shadow"])
        self.step = int(state["step"])


def posthoc_reconstruct(snapshots: Sequence[dict], sigma_rel: float, step: Optional[int] = None) -> List[torch.Tensor]:
    """EDM2's post-hoc EMA: the parameters of a power EMA of width `sigma_rel` at update `step` (default:
    the last snapshot's), as Σ_i x_i·θ̂_i over stored snapshots θ̂_i (EMA.snapshot), where x solves the
    least-squares fit of the target profile by the snapshots' profiles (fastcm/reference/ema.py). The
    sum is taken in float64 (the x_i alternate in sign and can be large); returns float32 tensors.
    The snapshots' profiles must span the target well: several times, two or more σ_rel (EDM2 keeps two
    σ_rel and a snapshot every few percent of training)."""
    if not snapshots:
        raise _error("posthoc_reconstruct: snapshots is empty")
    target = power(sigma_rel)
    step = max(s["step"] for s in snapshots) if step is None else step
    if any(s["step"] < 1 for s in snapshots) or step < 1:
        raise _error(
            f"posthoc_reconstruct: snapshot steps {[s['step'] for s in snapshots]} and step={step} must be >= 1"
        )
    coefficients = reference.posthoc_coefficients(
        [s["step"] for s in snapshots], [s["gamma"] for s in snapshots], step, target.gamma
    ).tolist()
    out = []
    for j in range(len(snapshots[0]["params"])):
        total = torch.zeros(snapshots[0]["params"][j].shape, dtype=torch.float64)
        for c, snapshot in zip(coefficients, snapshots):
            total += c * snapshot["params"][j].to(torch.float64)
        out.append(total.to(torch.float32))
    return out


__all__ = [
    "EMA",
    "Profile",
    "power",
    "power_from_gamma",
    "constant",
    "halflife",
    "ct_target",
    "posthoc_reconstruct",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
]
