"""DiffusionModule's options, grouped by concern: one dataclass per group, one command-line prefix per group.

    --model.schedule.*     the fixed noise schedule (when no --model.process is given)
    --model.training.*     the objective, its weighting and timesteps, EMA, memory layout and compilation
    --model.sampling.*     the sampler of grids, FID and predict, its steps and options, the seed and labels
    --model.guidance.*     classifier-free guidance, classifier guidance and autoguidance
    --model.evaluation.*   the likelihoods `test` logs

The parts (net, process, first_stage, timestep_distribution, optimizer, lr_scheduler) and the two options that fix
what the network computes (prediction, condition) stay at the top. `RENAMED` maps each flat option of earlier
versions to its place here: checkpoints that recorded the flat names load through `grouped_options`; on the command
line the four flags that docs name as stable (`--model.sampler`, `--model.sampling_steps`, `--model.eta`,
`--model.guidance_scale`) keep working, and every other old flag is a one-line error naming its replacement
(`translate_arguments`; a config file's old key gets the same hint, `moved_flags`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from src.errors import ConfigError

# The values the old flat `--model.schedule NAME` took (`NoiseSchedule.from_name`'s names then): given one of them,
# `--model.schedule` is the old flag, not the new group's config. A record of the past: not for new schedules.
SCHEDULE_NAMES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """The fixed noise schedule the net is trained on (ignored when --model.process is given; fixed by a checkpoint).

    Args:
        name: "linear" (DDPM) or "cosine" (improved DDPM).
        timesteps: number of diffusion steps T.
        beta_start: first beta of the linear schedules.
        beta_end: last beta of the linear schedules.
    """

    name: str = "linear"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass(frozen=True)
class Training:
    """What training minimises and how.

    Args:
        objective: "simple" (DDPM's L_simple, eq. 14, weighted by `loss_weighting`), "hybrid" (Improved DDPM's
            L_hybrid = L_simple + `vlb_weight` L_vlb, for a net with 2 x in_channels outputs, a learned variance), "vlb"
            (the variational bound itself: with the fixed sampling variance, DDPM's "true bound" of Table 2, or a
            learned variance's L_vlb alone), "vdm" (the variational diffusion model's bound in bits/dim, Kingma et al.
            2021, src/diffusion/vdm.py, which trains a learned --model.process), "vdm_discrete" (its T - 1 step
            form), "ssm" (sliced score matching, Song et al. 2019, src/diffusion/score.py) or the dotted path of a
            function of one's own (src/diffusion/losses.py, `Objective`; docs/extending.md).
        loss_weighting: per-example weight of L_simple by SNR(t): "none" (DDPM), "min_snr" (Hang et al. 2023,
            min(SNR, gamma) in the prediction target's terms) or the dotted path of a function weight(snr, prediction)
            (docs/extending.md). L_hybrid (learned variance) and val/loss stay unweighted.
        min_snr_gamma: gamma of "min_snr" (5 in the paper).
        vlb_weight: lambda of improved DDPM's L_hybrid = L_simple + lambda L_vlb (0.001), with objective "hybrid".
        timestep_sampling: how a batch draws its timesteps, for every objective (`losses.unit_times`): "uniform"
            (i.i.d., DDPM), "antithetic" (t paired with T - 1 - t), "low_discrepancy" (u_i = (u_0 + i / B) mod 1,
            VDM's) or "stratified" (one draw in each of B strata). Each example's t stays uniform.
        p_uncond: class-conditional nets (net.num_classes set): probability of training on the null label, which
            makes the net also unconditional, for classifier-free guidance (0.1; Ho & Salimans 2022).
        ema_decay: decay of the weights' exponential moving average (0.9999 in DDPM).
        ema_warmup: use the decay warm-up min(decay, (1 + n) / (10 + n)) (helps short runs).
        channels_last: train in NHWC memory layout (faster convolutions on GPUs with tensor cores; +9% on the
            2-core AVX-512 CPU we measured).
        compile: train through `torch.compile(net)`; the compiled wrapper is not a submodule, so checkpoint keys stay
            `net.*` and checkpoints load with or without it.
    """

    objective: str = "simple"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    vlb_weight: float = 0.001
    timestep_sampling: str = "uniform"
    p_uncond: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class Sampling:
    """How grids, FID and predict sample (`src/diffusion/sampler_settings.py: SamplerSettings` checks the first six).

    Args:
        sampler: a name of `samplers.SAMPLERS` ("ddim", "ddpm", "ddpm_respaced", "dpmpp_2m", or an SDE / ODE sampler
            of k_samplers.py), or the dotted import path of a sampler function (docs/extending.md).
        steps: sampling steps (not read by "ddpm", which runs all T steps).
        eta: DDIM eta in [0, 1]: 0 deterministic DDIM, 1 DDPM-like.
        skip: timestep spacing, one of `samplers.SKIP_TYPES`.
        variance: the DDPM variance, "fixed_small", "fixed_large" or "learned" (a net with 2 x channels outputs);
            also the variance of the variational bound (test/bpd, objective "vlb").
        options: options of the chosen sampler, each read as its type (`samplers.OPTION_TYPES`): rho, churn, snr,
            corrector_steps, solver_order, quantize, ... An option the sampler does not read is an error.
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every step (or clip it by dynamic thresholding).
        dynamic_threshold_percentile: with clip_denoised, clip x_0 by Imagen's dynamic thresholding instead of to
            [-1, 1] (Saharia et al. 2022, section 2.3): per sample, s = this quantile of |x_0| (a fraction, 0.995),
            at least 1; x_0 is clipped to [-s, s] and divided by s. None: the static clip.
        dynamic_threshold_max: the largest s of dynamic thresholding (diffusers' sample_max_value); None: no bound.
        seed: seed of the predict noise; sample i of a run always starts from the same x_T.
        labels: conditional nets: the labels of predict / FID / grid samples, used in turn (sample i gets
            labels[i % len]); None: all classes in turn (label = i % num_classes).
        condition_split: a net with --model.condition: the data's split whose images samples are conditioned on
            ("test" or "train"; sample i on image i, mod their number).
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    skip: str = "uniform"
    variance: str = "fixed_small"
    options: dict[str, bool | int | float] = field(default_factory=dict)
    clip_denoised: bool = False
    dynamic_threshold_percentile: float | None = None
    dynamic_threshold_max: float | None = None
    seed: int = 0
    labels: list[int] | None = None
    condition_split: str = "test"


@dataclass(frozen=True)
class Guidance:
    """Guidance at sampling time (grids, FID, predict).

    Args:
        scale: classifier-free guidance scale s = 1 + w (diffusers' convention; Ho & Salimans' weight is w):
            eps~ = s eps(x, t, y) + (1 - s) eps(x, t, null). 1: the plain conditional model, 0: unconditional,
            > 1: stronger guidance. Conditional nets only.
        interval: [sigma_lo, sigma_hi]: classifier-free guidance only at the steps whose noise level
            sigma_t = sqrt((1 - a_t) / a_t) (EDM's sigma) is in (sigma_lo, sigma_hi], the conditional model alone,
            one network evaluation, at the others (Kynkäänniemi et al. 2024). None: every step (twice the cost).
        classifier_path: a `src.models.classifier.NoisyClassifier` file (`NoisyClassifier.save`) for classifier
            guidance (Dhariwal & Nichol 2021); sample labels then come from its classes for unconditional nets.
        classifier_scale: classifier guidance scale s: eps^ = eps - sqrt(1 - a_t) s grad log p(y | x_t) (0: off).
        model: autoguidance (Karras et al. 2024): a weaker model of the same task (a checkpoint or export: a smaller
            net, or this recipe stopped early, e.g. posthoc_ema@0.25 or a `python -m src.posthoc_ema --step N` copy),
            which sampling extrapolates away from at every step, D_guide + a (D - D_guide), a = `autoguidance_scale`;
            alone or on top of classifier-free guidance. Same schedule, prediction and classes.
        autoguidance_scale: a of autoguidance (1: off).
    """

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    classifier_path: str | None = None
    classifier_scale: float = 0.0
    model: str | None = None
    autoguidance_scale: float = 1.0


@dataclass(frozen=True)
class Evaluation:
    """The likelihoods `test` logs.

    Args:
        bpd_timesteps: `test` logs the variational-bound NLL `test/bpd` with this many KL timesteps (stratified;
            None: all T, exact; 0: off), its terms, and `test/bpd_se`, its standard error over the test images. With
            objective vdm / vdm_discrete, VDM's own bound with its diffusion term at this many stratified times.
        ode_bpd_batches: `test` also logs `test/ode_bpd`, the exact NLL through the probability-flow ODE (Song et al.
            2021, appendix D; adaptive RK45 with a Hutchinson divergence, uniform dequantisation), on this many
            test batches (0: off; each image costs some hundreds of network calls with gradients).
    """

    bpd_timesteps: int | None = 0
    ode_bpd_batches: int = 0


GROUPS: dict[str, type] = {
    "schedule": Schedule,
    "training": Training,
    "sampling": Sampling,
    "guidance": Guidance,
    "evaluation": Evaluation,
}

# The flat options of earlier versions (checkpoint hyperparameters, --model.<old> flags) -> (group, field).
RENAMED: dict[str, tuple[str, str]] = {
    "schedule": ("schedule", "name"),
    "timesteps": ("schedule", "timesteps"),
    "beta_start": ("schedule", "beta_start"),
    "beta_end": ("schedule", "beta_end"),
    "objective": ("training", "objective"),
    "loss_weighting": ("training", "loss_weighting"),
    "min_snr_gamma": ("training", "min_snr_gamma"),
    "vlb_weight": ("training", "vlb_weight"),
    "timestep_sampling": ("training", "timestep_sampling"),
    "p_uncond": ("training", "p_uncond"),
    "ema_decay": ("training", "ema_decay"),
    "ema_warmup": ("training", "ema_warmup"),
    "channels_last": ("training", "channels_last"),
    "compile": ("training", "compile"),
    "sampler": ("sampling", "sampler"),
    "sampling_steps": ("sampling", "steps"),
    "eta": ("sampling", "eta"),
    "skip": ("sampling", "skip"),
    "ddpm_variance": ("sampling", "variance"),
    "sampler_options": ("sampling", "options"),
    "clip_denoised": ("sampling", "clip_denoised"),
    "dynamic_threshold_percentile": ("sampling", "dynamic_threshold_percentile"),
    "dynamic_threshold_max": ("sampling", "dynamic_threshold_max"),
    "sample_seed": ("sampling", "seed"),
    "sample_labels": ("sampling", "labels"),
    "condition_split": ("sampling", "condition_split"),
    "guidance_scale": ("guidance", "scale"),
    "guidance_interval": ("guidance", "interval"),
    "classifier_path": ("guidance", "classifier_path"),
    "classifier_scale": ("guidance", "classifier_scale"),
    "guidance_model": ("guidance", "model"),
    "autoguidance_scale": ("guidance", "autoguidance_scale"),
    "bpd_timesteps": ("evaluation", "bpd_timesteps"),
    "ode_bpd_batches": ("evaluation", "ode_bpd_batches"),
}
# The old flags that design documents name as stable: still accepted on the command line (their new names are shown).
KEPT_FLAGS = ("sampler", "sampling_steps", "eta", "guidance_scale")


def flag(old: str) -> str:
    """The command-line flag that replaced the flat option `old`: "sampling_steps" -> "--model.sampling.steps"."""
    group, name = RENAMED[old]
    return f"--model.{group}.{name}"


def group(cls: type, value: object) -> object:
    """`value` as the group `cls`: an instance as it is, a dict (a checkpoint's record, a config) read into one,
    None as the defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}; it has {', '.join(sorted(names))}")
        value = dict(value)
        if cls is Guidance and value.get("interval") is not None:  # a YAML list
            value["interval"] = tuple(value["interval"])
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")


def grouped_options(options: dict) -> dict:
    """Hyperparameters with the flat options of earlier versions (`RENAMED`) moved into their groups; grouped ones
    and every other key (net, process, prediction, ...) stay as they are."""
    # "schedule" is both an old flat name (the schedule's name, a string) and the new group (a dict or a Schedule).
    old_names = {
        key for key, value in options.items() if key in RENAMED and (key != "schedule" or isinstance(value, str))
    }
    out = {key: value for key, value in options.items() if key not in old_names}
    for old in old_names:
        name, attribute = RENAMED[old]
        section = out.get(name)
        section = dict(section) if isinstance(section, dict) else dataclasses.asdict(group(GROUPS[name], section))
        section[attribute] = options[old]
        out[name] = section
    return out


def flat_options(options: dict) -> dict:
    """The flat view of hyperparameters (old names, `RENAMED`), grouped or flat: what readers of a checkpoint's
    hyperparameters (`DiffusionModel.load`, the CLI's --ckpt_path) look options up by."""
    out = {key: value for key, value in options.items() if key not in GROUPS}
    for old, (name, attribute) in RENAMED.items():
        section = options.get(name)
        if isinstance(section, dict) and attribute in section:
            out[old] = section[attribute]
        elif dataclasses.is_dataclass(section) and not isinstance(section, type):
            out[old] = getattr(section, attribute)
        elif old in options and not isinstance(options[old], dict):
            out[old] = options[old]
    return out


def moved_flags() -> dict[str, str]:
    """Each old flag -> its replacement ("--model.sampling_steps" -> "--model.sampling.steps"), for the hints of
    unknown options and config keys (`src.errors.did_you_mean`)."""
    return {f"--model.{old}": flag(old) for old in RENAMED}


def translate_arguments(args: list[str]) -> list[str]:
    """Command-line arguments with the kept old flags (`KEPT_FLAGS`) renamed to their groups' flags; any other flat
    option of earlier versions is a one-line ConfigError naming its replacement."""
    out = []
    for i, argument in enumerate(args):
        name, eq, value = argument.partition("=")
        old = name.removeprefix("--model.")
        if not name.startswith("--model.") or old not in RENAMED:
            out.append(argument)
            continue
        if old == "schedule":  # also the new group's own flag, which takes a config: only a schedule's name is old
            given = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if given not in SCHEDULE_NAMES:
                out.append(argument)
                continue
        if old not in KEPT_FLAGS:
            raise ConfigError(f"{name} is now {flag(old)} (DiffusionModule's options are grouped by concern)")
        out.append(flag(old) + eq + value)
    return out
