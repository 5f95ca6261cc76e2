"""How to sample: one object with one set of names, from the config to the samplers to an export.

The names are those of `samplers.sample` (`steps`, `variance`, `clip_x0`, ...). The command line keeps its own
documented flags (`--model.sampling_steps`, `--model.ddpm_variance`, `--model.clip_denoised`, ...); `FLAGS` below
is the one table that maps them, used to name the flag in an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from src.diffusion.samplers import CONTINUOUS_SAMPLERS, DDPM_VARIANCES, SAMPLERS, SKIP_TYPES, check_sampler
from src.errors import ConfigError

# SamplerSettings field -> the DiffusionModule option (command-line flag) that sets it.
FLAGS = {
    "sampler": "--model.sampler",
    "steps": "--model.sampling_steps",
    "eta": "--model.eta",
    "skip": "--model.skip",
    "variance": "--model.ddpm_variance",
    "clip_x0": "--model.clip_denoised",
    "options": "--model.sampler_options",
}


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler and its options; `sample(model, x_T, schedule, **settings.kwargs())` runs it.

    Args:
        sampler: a name of `samplers.SAMPLERS` ("ddim", "ddpm", "ddpm_respaced", "dpmpp_2m", or an SDE / ODE sampler
            of k_samplers.py), or the dotted import path of a sampler function (docs/extending.md).
        steps: sampling steps (ignored by "ddpm", which runs all T steps).
        eta: DDIM eta in [0, 1]: 0 deterministic DDIM, 1 DDPM-like.
        skip: timestep spacing, one of `samplers.SKIP_TYPES`.
        variance: the DDPM variance, "fixed_small", "fixed_large" or "learned" (a net with 2 x channels outputs).
        clip_x0: clamp the predicted x_0 to [-1, 1] at every step.
        options: options of the SDE / ODE samplers (rho, churn, snr, corrector_steps, solver_order, quantize).
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    skip: str = "uniform"
    variance: str = "fixed_small"
    clip_x0: bool = False
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options or {}))
        check_sampler(self.sampler)  # a built-in name, or an importable package.module.function
        if self.options and self.sampler in SAMPLERS and self.sampler not in CONTINUOUS_SAMPLERS:
            raise ConfigError(
                f"{FLAGS['options']} apply to {', '.join(CONTINUOUS_SAMPLERS)}, not to {FLAGS['sampler']} {self.sampler}"
            )
        if self.sampler in CONTINUOUS_SAMPLERS:
            from src.diffusion.k_samplers import CONTINUOUS_OPTIONS

            unknown = sorted(set(self.options) - set(CONTINUOUS_OPTIONS))
            if unknown:
                raise ConfigError(
                    f"{FLAGS['options']}: unknown {', '.join(unknown)}; choose from {', '.join(CONTINUOUS_OPTIONS)}"
                )
        if self.skip not in SKIP_TYPES:
            raise ConfigError(f"{FLAGS['skip']} {self.skip!r} is unknown; choose one of {', '.join(SKIP_TYPES)}")
        if self.variance not in DDPM_VARIANCES + ("learned",):
            raise ConfigError(
                f"{FLAGS['variance']} {self.variance!r} is unknown; choose one of {', '.join(DDPM_VARIANCES)}, learned"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"{FLAGS['eta']} must be in [0, 1], got {self.eta}")
        if self.steps < 1:
            raise ConfigError(f"{FLAGS['steps']} must be at least 1, got {self.steps}")

    @classmethod
    def from_options(cls, options: dict) -> SamplerSettings:
        """The settings of DiffusionModule's options (`sampler`, `sampling_steps`, `ddpm_variance`, ...: the names of
        `FLAGS`), e.g. a checkpoint's hyperparameters; options it does not hold keep the defaults."""
        names = {flag.removeprefix("--model."): name for name, flag in FLAGS.items()}
        return cls(**{name: options[option] for option, name in names.items() if options.get(option) is not None})

    def check_steps(self, num_timesteps: int) -> None:
        """`steps` must fit the schedule's T."""
        if not 1 <= self.steps <= num_timesteps:
            raise ConfigError(f"{FLAGS['steps']} must be in [1, {num_timesteps}] (--model.timesteps), got {self.steps}")

    def replace(self, **changes: object) -> SamplerSettings:
        """A copy with `changes` (field names; unknown names are an error, not silently ignored)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown sampler setting(s) {', '.join(unknown)}; fields: {', '.join(FLAGS)}")
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments of `samplers.sample`: the fields, with `options` spread out."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**fields, **self.options}

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (the export's "sampler" entry); `SamplerSettings(**d)` reads it back."""
        return dataclasses.asdict(self)
