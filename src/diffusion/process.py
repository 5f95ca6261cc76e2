"""The forward diffusion process as an `nn.Module`: alpha(t) and sigma(t) in continuous time, fixed or learned.

A variance-preserving process (DDPM eq. 4; Kingma et al. 2021, "Variational Diffusion Models", eq. 1-3)

    x_t = alpha(t) x_0 + sigma(t) eps,      alpha(t)^2 + sigma(t)^2 = 1,
    lambda(t) = log SNR(t) = log(alpha^2 / sigma^2),   alpha^2 = sigmoid(lambda),   sigma^2 = sigmoid(-lambda),

is fixed by its log-SNR curve, decreasing in t. Time is measured in the units the network is conditioned on: the
DDPM timestep, t in [0, T - 1], continuous between the T grid points (t = 0 the least noisy), so a network
trained on integer timesteps and one trained on a continuous process read t the same way.

`DiscreteProcess` is a `NoiseSchedule` (DDPM's linear, improved DDPM's cosine, latent diffusion's
scaled_linear, or given betas) seen this way: at integer t it returns the schedule's own float64 tables, so
training through it is bit-identical to training on the schedule; between grid points log SNR is interpolated
linearly, which is linear in log sigma_EDM = -lambda / 2, as the continuous samplers interpolate
(`continuous.DiscreteSigmaDenoiser.t_to_sigma`). It has no parameters or buffers: a checkpoint of a model with a
fixed schedule holds nothing for it.

A learned schedule subclasses `DiffusionProcess` and implements `log_snr(t)` with `nn.Parameter`s (VDM's
linear gamma(t) = -lambda(t) with learned endpoints, or a monotone network): the module trains them with the
network, checkpoints and exports save them, and the samplers read the discrete `schedule` the process takes at
the integer timesteps (computed from the current parameters, detached, float64).

Every consumer of a process or a schedule asks it the same three things, which `NoiseSchedule` answers too:
`num_timesteps`, `alpha_sigma(t, x)` and `snr_at(t)` (the losses and `parameterization.py` take either).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from src.diffusion.schedule import NoiseSchedule, alpha_sigma_from_log_snr


class DiffusionProcess(nn.Module):
    """A variance-preserving diffusion process given by its log-SNR curve `log_snr(t)`, t in [0, T - 1].

    Subclasses implement `log_snr` (decreasing in t, differentiable in their parameters) and, to be rebuilt from a
    checkpoint or an export, record their constructor arguments in `self.config` (as the networks do).
    """

    def __init__(self, num_timesteps: int) -> None:
        super().__init__()
        if int(num_timesteps) < 2:
            raise ValueError(f"a diffusion process needs at least 2 timesteps, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)
        self._schedule_cache: tuple[tuple, NoiseSchedule] | None = None

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha(t)^2 / sigma(t)^2) for timesteps t (any shape, integer or fractional)."""
        raise NotImplementedError(f"{type(self).__name__} must implement log_snr(t)")

    def alpha_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t) = sqrt(sigmoid(lambda)) and sigma(t) = sqrt(sigmoid(-lambda)) of a (B,) batch of timesteps,
        shaped to broadcast against x (B, ...) and in x's dtype (the sigmoids keep alpha^2 + sigma^2 = 1 without
        cancellation at either end)."""
        alpha, sigma = alpha_sigma_from_log_snr(self.log_snr(t.to(self._device())), x.ndim)
        return alpha.to(device=x.device, dtype=x.dtype), sigma.to(device=x.device, dtype=x.dtype)

    def snr_at(self, t: Tensor) -> Tensor:
        """SNR(t) = exp(lambda(t)) of each timestep, float64 (what loss weightings read)."""
        return self.log_snr(t.to(self._device())).to(torch.float64).exp()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def _device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def schedule(self) -> NoiseSchedule:
        """The discrete schedule at t = 0..T-1 (what the discrete samplers, guidance and the bound index):
        alpha-bar_t = sigmoid(lambda(t)) in float64, detached, recomputed only when a parameter has changed."""
        params = list(self.parameters())
        key = (self._device(), tuple((id(p), p._version) for p in params))
        if self._schedule_cache is not None and self._schedule_cache[0] == key:
            return self._schedule_cache[1]
        with torch.no_grad():
            steps = torch.arange(self.num_timesteps, device=self._device())
            alphas_cumprod = torch.sigmoid(self.log_snr(steps).to(torch.float64)).cpu()
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        schedule = NoiseSchedule(1.0 - alphas_cumprod / previous)
        if key[0].type != "cpu":
            schedule = schedule.to(key[0])
        self._schedule_cache = (key, schedule)
        return schedule

    def has_parameters(self) -> bool:
        """Whether the process is learned (has parameters the optimizer trains)."""
        return next(self.parameters(), None) is not None


class DiscreteProcess(DiffusionProcess):
    """A fixed `NoiseSchedule` as a process: its float64 tables at integer t, log SNR interpolated linearly between.

    Args:
        schedule: the schedule (its tables are used as they are).
        recipe: the `NoiseSchedule.from_name` arguments that built it (`schedule.schedule_recipe(...)`), recorded
            in exports; None: the betas are.
    """

    def __init__(self, schedule: NoiseSchedule, recipe: dict | None = None) -> None:
        super().__init__(schedule.num_timesteps)
        self._table = schedule
        self.recipe = recipe

    @classmethod
    def from_name(cls, name: str, timesteps: int = 1000, **kwargs: float) -> DiscreteProcess:
        recipe = {"name": name, "timesteps": int(timesteps), **kwargs}
        return cls(NoiseSchedule.from_name(name, timesteps, **kwargs), recipe)

    @property
    def schedule(self) -> NoiseSchedule:
        return self._table

    def _device(self) -> torch.device:
        return self._table.betas.device

    def _apply(self, fn, recurse: bool = True):
        # No parameters or buffers (nothing in state dicts, old checkpoints load unchanged), so the tables follow a
        # `.to(device)` here: the device `fn` sends an empty tensor to. Their dtype stays float64 (float32 on MPS).
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self._table.betas.device)).device
        if device != self._table.betas.device:
            self._table = self._table.to(device)
        return self

    def log_snr(self, t: Tensor) -> Tensor:
        """log(a_t / (1 - a_t)) of the table at integer t; linear between floor(t) and ceil(t). Float64."""
        return self._table.log_snr_at(t)

    # The schedule answers these itself, at integer t from its float64 tables (bit-identical to training on the
    # schedule), at fractional t from the interpolated log SNR.
    def alpha_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._table.alpha_sigma(t, x)

    def snr_at(self, t: Tensor) -> Tensor:
        return self._table.snr_at(t)

    def extra_repr(self) -> str:
        return repr(self._table)


def as_process(schedule: NoiseSchedule | DiffusionProcess, recipe: dict | None = None) -> DiffusionProcess:
    """A process for either: a `DiffusionProcess` as it is, a `NoiseSchedule` as its `DiscreteProcess`."""
    if isinstance(schedule, DiffusionProcess):
        return schedule
    if isinstance(schedule, NoiseSchedule):
        return DiscreteProcess(schedule, recipe)
    raise TypeError(f"expected a NoiseSchedule or a DiffusionProcess, got {type(schedule).__name__}")
