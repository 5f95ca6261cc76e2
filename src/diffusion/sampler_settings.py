"""How to sample: one object with one set of names, from the config to the samplers to an export.

The names are those of `samplers.sample` (`steps`, `variance`, `clip_x0`, ...), and of DiffusionModule's sampling
options (`src.options.Sampling`: `--model.sampling.steps`, ...), except clipping: the command line's
`--model.sampling.clip_denoised` and the dynamic threshold's two flags (`THRESHOLD_FLAGS`) make `clip_x0` False,
True or a `DynamicThreshold`. `FLAGS` names the flag of each field in an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from src.diffusion.parameterization import DynamicThreshold, X0Clip
from src.diffusion.samplers import (
    BUILTIN_SAMPLERS,
    DDPM_VARIANCES,
    OPTION_NAMES,
    SAMPLER_ARGUMENTS,
    SAMPLERS,
    SKIP_TYPES,
    check_sampler,
    option_readers,
    option_value,
)
from src.errors import ConfigError

# SamplerSettings field -> the DiffusionModule option (command-line flag) that sets it.
FLAGS = {
    "sampler": "--model.sampling.sampler",
    "steps": "--model.sampling.steps",
    "eta": "--model.sampling.eta",
    "skip": "--model.sampling.skip",
    "variance": "--model.sampling.variance",
    "clip_x0": "--model.sampling.clip_denoised",
    "options": "--model.sampling.options",
}
# SamplerSettings field -> its flat option name (a checkpoint's hyperparameters, src.options.flat_options).
FLAT_NAMES = {
    "sampler": "sampler",
    "steps": "sampling_steps",
    "eta": "eta",
    "skip": "skip",
    "variance": "ddpm_variance",
    "clip_x0": "clip_denoised",
    "options": "sampler_options",
}
# DynamicThreshold field -> the DiffusionModule option that sets it; with either, `clip_x0` is a DynamicThreshold.
THRESHOLD_FLAGS = {
    "percentile": "--model.sampling.dynamic_threshold_percentile",
    "max_value": "--model.sampling.dynamic_threshold_max",
}
FLAT_THRESHOLD_NAMES = {"percentile": "dynamic_threshold_percentile", "max_value": "dynamic_threshold_max"}


def x0_clip(clip: bool, percentile: float | None = None, max_value: float | None = None) -> X0Clip:
    """`clip_x0` of the command-line options `--model.sampling.clip_denoised` (`clip`) and the dynamic threshold's
    `percentile` and `max_value`: False, True (clamp to [-1, 1]) or a DynamicThreshold. A combination that means
    nothing (a maximum without a percentile, a percentile with clipping off) is a one-line ConfigError."""
    p_flag, max_flag = THRESHOLD_FLAGS["percentile"], THRESHOLD_FLAGS["max_value"]
    if percentile is None:
        if max_value is not None:
            raise ConfigError(
                f"{max_flag} {max_value} bounds the dynamic threshold, which is off: pass {p_flag} too (e.g. 0.995), "
                f"or drop {max_flag}"
            )
        return bool(clip)
    if not clip:
        raise ConfigError(
            f"{p_flag} {percentile} chooses how {FLAGS['clip_x0']} clips x_0, and {FLAGS['clip_x0']} is false: pass "
            f"{FLAGS['clip_x0']} true, or drop {p_flag}"
        )
    if not 0.0 < percentile <= 1.0:
        raise ConfigError(f"{p_flag} must be in (0, 1] (a fraction: 0.995 is the 99.5th percentile), got {percentile}")
    if max_value is not None and not max_value >= 1.0:
        raise ConfigError(
            f"{max_flag} must be at least 1 (s is never below 1; 1 makes it the static clip of {FLAGS['clip_x0']}), "
            f"got {max_value}"
        )
    return DynamicThreshold(float(percentile), None if max_value is None else float(max_value))


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler and its options; `sample(model, x_T, schedule, **settings.kwargs())` runs it.

    Args:
        sampler, steps, eta, skip, variance: as DiffusionModule's sampling options (`src.options.Sampling`) document
            them (--model.sampling.<name>).
        clip_x0: how the predicted x_0 is bounded at every step: False (not at all), True (clamped to [-1, 1]) or a
            `DynamicThreshold` (Imagen's dynamic thresholding; a {"percentile", "max_value"} dict is read as one).
        options: options of the SDE / ODE samplers (rho, churn, snr, corrector_steps, solver_order, quantize), of
            the DDPM samplers (variance_gamma: Imagen Video's interpolated variance, `samplers.ddpm_sample`) and of
            langevin; each value is read as its type (`samplers.OPTION_TYPES`: counts int, switches bool).

    Each built-in sampler reads only some of these (`samplers.BUILTIN_SAMPLERS`: its arguments and options):
    `steps`, `eta` or `skip` set to a value other than the default, or an option given, that the sampler does not
    read is a one-line ConfigError naming the sampler and what it takes, never silently ignored. `variance` is
    checked where its other reader is known, the bound of `test/bpd` (`check_variance`). A sampler of one's own
    (a dotted path) receives everything.
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    skip: str = "uniform"
    variance: str = "fixed_small"
    clip_x0: X0Clip = False
    options: dict[str, float | int | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options or {}))
        if isinstance(self.clip_x0, dict):  # an export's to_dict() entry
            clip = self.clip_x0
            object.__setattr__(self, "clip_x0", x0_clip(True, clip.get("percentile"), clip.get("max_value")))
        check_sampler(self.sampler)  # a built-in name, or an importable package.module.function
        if self.sampler in SAMPLERS:
            unknown = sorted(set(self.options) - set(OPTION_NAMES))
            if unknown:
                raise ConfigError(
                    f"{FLAGS['options']}: unknown {', '.join(unknown)}; choose from {', '.join(OPTION_NAMES)}"
                )
            # Each value as the type it is read as ({quantize: true}, {solver_order: 3}); a sampler of one's own
            # gets its options as given.
            object.__setattr__(self, "options", {k: option_value(k, v) for k, v in self.options.items()})
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
        unread = self.unread()
        if unread:
            raise ConfigError(self._unread_message(unread))

    def unread(self) -> list[str]:
        """What the chosen built-in sampler does not read although it is set: `steps`, `eta` or `skip` of a value
        other than the default, and the names in `options`. Empty for a sampler of one's own."""
        if self.sampler not in SAMPLERS:
            return []
        takes = SAMPLER_ARGUMENTS[self.sampler]
        unread = [
            name for name in ("steps", "eta", "skip") if name not in takes and getattr(self, name) != _DEFAULTS[name]
        ]
        return unread + [name for name in self.options if name not in BUILTIN_SAMPLERS[self.sampler].options]

    def _unread_message(self, unread: list[str]) -> str:
        """One line: what the sampler does not read (and which samplers do), the fix, and what it takes."""
        parts, fixes = [], []
        for name in unread:
            if name in FLAGS:
                users = [s for s, takes in SAMPLER_ARGUMENTS.items() if name in takes]
                others = [s for s in SAMPLER_ARGUMENTS if s not in users]
                users = users if len(users) <= len(SAMPLER_ARGUMENTS) // 2 else [f"all but {', '.join(others)}"]
                parts.append(f"{FLAGS[name]} {getattr(self, name)} (read by {', '.join(users)})")
                fixes.append(f"{FLAGS[name]} {_DEFAULTS[name]}")
            else:
                parts.append(f"{FLAGS['options']} {name} (read by {', '.join(option_readers(name))})")
        options = [name for name in unread if name not in FLAGS]
        if options:
            fixes.append(f"{FLAGS['options']} without {', '.join(options)}")
        takes = [FLAGS[name] for name in SAMPLER_ARGUMENTS[self.sampler]] + [FLAGS["clip_x0"]]
        if BUILTIN_SAMPLERS[self.sampler].options:
            takes.append(f"{FLAGS['options']} {{{', '.join(BUILTIN_SAMPLERS[self.sampler].options)}}}")
        it = "it" if len(unread) == 1 else "them"
        return (f"{FLAGS['sampler']} {self.sampler} does not read {', '.join(parts)}: pass {' and '.join(fixes)}, or "
                f"choose a sampler that reads {it}; {self.sampler} takes {', '.join(takes)}")  # fmt: skip

    def check_variance(self, bound: bool) -> None:
        """`variance` is read by the DDPM samplers and by the variational bound (`bound`: test/bpd is on, or the
        objective is the bound); a value other than the default that neither reads is a ConfigError."""
        if self.variance == "fixed_small" or self.sampler not in SAMPLERS:
            return
        if "variance" in SAMPLER_ARGUMENTS[self.sampler] or bound:
            return
        users = ", ".join(s for s, takes in SAMPLER_ARGUMENTS.items() if "variance" in takes)
        bound_note = " and by test/bpd with --model.evaluation.bpd_timesteps, 0 here"
        raise ConfigError(
            f"{FLAGS['sampler']} {self.sampler} does not read {FLAGS['variance']} {self.variance} (read by "
            f"{FLAGS['sampler']} {users}{bound_note}): pass {FLAGS['variance']} fixed_small, or choose a sampler "
            "that reads it"
        )

    @classmethod
    def from_options(cls, options: dict, stored: bool = False) -> SamplerSettings:
        """The settings of DiffusionModule's options by their flat names (`sampler`, `sampling_steps`, `ddpm_variance`,
        ...: `FLAT_NAMES`; `src.options.flat_options` gives them of grouped ones), e.g. a checkpoint's
        hyperparameters; options it does not hold keep the defaults. `stored`: the options were recorded (a
        checkpoint, an export), see `stored`."""
        fields = {name: options[option] for name, option in FLAT_NAMES.items() if options.get(option) is not None}
        threshold = {k: options.get(option) for k, option in FLAT_THRESHOLD_NAMES.items()}
        if any(value is not None for value in threshold.values()):
            fields["clip_x0"] = x0_clip(fields.get("clip_x0", False), **threshold)
        return cls.stored(**fields) if stored else cls(**fields)

    @classmethod
    def stored(cls, **fields: object) -> SamplerSettings:
        """Settings recorded before unread ones were refused (a checkpoint, an export): what the sampler does not
        read is reset to its default, which changes nothing, since the sampler never read it."""
        sampler = fields.get("sampler", cls.sampler)
        if sampler not in SAMPLERS:
            return cls(**fields)
        for name in ("steps", "eta", "skip"):
            if name in fields and name not in SAMPLER_ARGUMENTS[sampler]:
                fields[name] = _DEFAULTS[name]
        if fields.get("options"):
            takes = BUILTIN_SAMPLERS[sampler].options
            fields["options"] = {k: v for k, v in fields["options"].items() if k in takes}
        return cls(**fields)

    def check_steps(self, num_timesteps: int) -> None:
        """`steps` must fit the schedule's T (for a sampler that reads it: "ddpm" runs all T steps whatever T is)."""
        if self.sampler in SAMPLERS and "steps" not in SAMPLER_ARGUMENTS[self.sampler]:
            return
        if not 1 <= self.steps <= num_timesteps:
            raise ConfigError(
                f"{FLAGS['steps']} must be in [1, {num_timesteps}] (--model.schedule.timesteps), got {self.steps}"
            )

    def replace(self, **changes: object) -> SamplerSettings:
        """A copy with `changes` (field names; unknown names are an error, not silently ignored). A new `sampler`
        drops what it does not read from the old settings (`stored`); what `changes` set must fit it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown sampler setting(s) {', '.join(unknown)}; fields: {', '.join(FLAGS)}")
        if "sampler" not in changes:
            return dataclasses.replace(self, **changes)
        kept = {k: v for k, v in self.to_dict().items() if k not in changes}
        carried = type(self).stored(sampler=changes["sampler"], **kept)  # the old settings, fitted to the new sampler
        return dataclasses.replace(carried, **changes)

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments of `samplers.sample`: the fields, with `options` spread out."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**fields, **self.options}

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (the export's "sampler" entry); `SamplerSettings(**d)` reads it back."""
        return dataclasses.asdict(self)


# The default of each field but `options` (what "set" is measured against).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerSettings) if f.name != "options"}
