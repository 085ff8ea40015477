"""A one-call sCM / rCM training step (continuous-time consistency training in TrigFlow).

    step = fastcm.training.SCMStep(model, optimizer, sigma_data=0.5, warmup_steps=10_000,
                                   ema_update=lambda m: ema.update(m))
    for x0, labels in loader:
        loss = step(x0, labels)

One call: TrigFlow times t = arctan(e^τ/σd), τ ~ N(P_mean, P_std²); x_t = cos t·x0 + sin t·z,
z ~ N(0, σd²); the network output F⁻ and its tangent cos t·sin t·dF⁻/dt under no_grad, from the
model's explicit tangent pass `forward_with_tangent(x, t, x_t, t_t, y)` where it has one
(fastcm.nn.DiT) or torch.func.jvp otherwise; F with gradient; fastcm.scm_loss with the tangent
warm-up r = min(1, step/warmup_steps), tangent normalisation and an optional adaptive
log-variance weight; backward, optimizer step and an EMA hook.
"""

from typing import Callable, Optional

import torch

from .losses import scm_loss
from .schedules import tangent_warmup, trigflow_sample_t


class SCMStep:
    """The sCM training step of Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time
    Consistency Models" (Alg. 1), for any model with the DiT signature model(x, t, y) -> F, F
    shaped like x; the model receives x_t/σd and the TrigFlow time t (B,) as it is.

    Args:
        model, optimizer: the network F_θ and its optimizer.
        sigma_data, p_mean, p_std: σd and the log-normal proposal of τ (t = arctan(e^τ/σd)).
        warmup_steps: tangent warm-up length (r rises linearly from 0 to 1); 0 disables it.
        tangent_norm_c, tangent_norm: the tangent normalisation of fastcm.scm_loss.
        logvar: optional module t (B,) -> (B,) learned log-variance weight (its parameters must be
            in `optimizer`); None: no adaptive weight.
        ema_update: called with the model after every optimizer step.
        generator: torch.Generator for t and z, on x0's device (None: that device's global one).
    Calling the step with x0 (B, ...) and labels y (or None) returns the loss, detached. t is
    drawn in float64 and given to the model and the loss in float64 for float64 x0, float32 otherwise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sigma_data: float = 0.5,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        warmup_steps: int = 10000,
        tangent_norm_c: float = 0.1,
        tangent_norm: str = "l2",
        logvar: Optional[Callable] = None,
        ema_update: Optional[Callable[[torch.nn.Module], None]] = None,
        generator: Optional[torch.Generator] = None,
    ):
        if not sigma_data > 0:
            raise ValueError(f"fastcm.training.SCMStep: sigma_data must be > 0, got {sigma_data}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"fastcm.training.SCMStep: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.model, self.optimizer, self.logvar, self.ema_update = model, optimizer, logvar, ema_update
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), p_mean, p_std
        self.warmup_steps, self.tangent_norm_c, self.tangent_norm = warmup_steps, tangent_norm_c, tangent_norm
        self.generator = generator
        self.step_count = 0

    def tangent(self, x: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, t_t: torch.Tensor, y=None):
        """(F(x, t, y), its directional derivative along (x_t, t_t)), under no_grad."""
        with torch.no_grad():
            if hasattr(self.model, "forward_with_tangent"):
                return self.model.forward_with_tangent(x, t, x_t, t_t, y)
            return torch.func.jvp(lambda a, s: self.model(a, s, y), (x, t), (x_t, t_t))

    def warmup(self) -> float:
        return 1.0 if self.warmup_steps == 0 else tangent_warmup(self.step_count, self.warmup_steps)

    def __call__(self, x0: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, sd = x0.shape[0], self.sigma_data
        # t and z come from one generator, so both are drawn where z lives: on x0's device.
        t = trigflow_sample_t(
            batch,
            sigma_data=sd,
            p_mean=self.p_mean,
            p_std=self.p_std,
            generator=self.generator,
            device=x0.device,
            dtype=torch.float64,
        )
        t = t if x0.dtype == torch.float64 else t.float()
        z = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype) * sd
        view = t.to(x0.dtype).reshape((batch,) + (1,) * (x0.dim() - 1))
        cos, sin = torch.cos(view), torch.sin(view)
        x_t = cos * x0 + sin * z
        dx_dt = cos * z - sin * x0
        speed = torch.cos(t) * torch.sin(t)
        F_minus, F_jvp = self.tangent(x_t / sd, t, (cos * sin) * dx_dt / sd, speed, y)
        F = self.model(x_t / sd, t, y)
        loss = scm_loss(
            F,
            F_minus,
            F_jvp,
            x_t,
            dx_dt,
            t,
            sigma_data=sd,
            r=self.warmup(),
            tangent_norm_c=self.tangent_norm_c,
            tangent_norm=self.tangent_norm,
            logvar=None if self.logvar is None else self.logvar(t),
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema_update is not None:
            self.ema_update(self.model)
        self.step_count += 1
        return loss.detach()


__all__ = ["SCMStep"]
