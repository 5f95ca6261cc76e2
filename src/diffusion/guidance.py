"""Guidance: turning a class-conditional denoiser into the plain `model(x_t, t) -> eps` that samplers take.

Classifier-free guidance (Ho & Salimans 2021, "Classifier-Free Diffusion Guidance", eq. 6): one network eps_theta(x_t, t, y) is trained with the label replaced by a null label
with probability p_uncond (`drop_labels`), so it is both conditional and unconditional, and sampling uses

    eps~(x_t, t, y) = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)

w = 0 is the plain conditional model, w = -1 the unconditional one, w > 0 sharpens p(y | x_t). This module (and
`--model.guidance.scale`) is written with the diffusers/GLIDE scale s = 1 + w:

    eps~ = s eps_theta(x_t, t, y) + (1 - s) eps_theta(x_t, t, null) = eps_u + s (eps_c - eps_u),

so s = 1 is the conditional model and s = 0 the unconditional one; `guidance_scale_from_w` converts.

Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
and Distribution Quality in Diffusion Models", section 3): the guided eps~ only where the noise level sigma lies in
(sigma_lo, sigma_hi], the conditional model alone elsewhere, with ONE network evaluation instead of two. Guidance at
high noise mostly drags samples towards a few modes (less diversity) and at low noise it does little; the interval
keeps it where it improves the image. sigma is schedule-independent, EDM's noise level of x_t / alpha_t = x_0 +
sigma eps: sigma_t = sqrt((1 - a_t) / a_t) for a DDPM schedule (`timestep_sigma`), the sigma the SDE / ODE samplers
step through.

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2): the
negative branch is not the same network without the label but a weaker model D_0 of the same task (smaller,
trained for less time; conditioned on the same label), D~ = D_0 + s (D_1 - D_0). The two models' errors differ
mostly where the strong one is better, so extrapolating away from the weak one sharpens the samples without pulling
them towards a few modes as the unconditional branch does: it improves quality without the loss of variety of
classifier-free guidance, and it works for unconditional models too (`AutoGuidance`).

Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Algorithm 2 and
eq. 14): with a classifier p_phi(y | x_t, t) trained on noisy
images, eps^ = eps_theta(x_t, t) - sqrt(1 - a_t) s grad_{x_t} log p_phi(y | x_t, t) (`ClassifierGuidance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from src.diffusion.continuous import vp_sigmas
from src.diffusion.schedule import NoiseSchedule

ConditionalDenoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def guidance_scale_from_w(w: float) -> float:
    """s = 1 + w: the diffusers/GLIDE guidance scale of the classifier-free guidance weight w (Ho & Salimans)."""
    return 1.0 + w


def drop_labels(y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by `null_label` with probability `p_uncond` (Ho & Salimans 2021, Algorithm 1, line 3),
    so that the same network learns eps_theta(x_t, t, null), the unconditional model."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if p_uncond == 0.0:
        return y
    u = torch.rand(y.shape, generator=generator, device=generator.device if generator else y.device).to(y.device)
    return torch.where(u < p_uncond, torch.full_like(y, null_label), y)


def timestep_sigma(sigmas: Tensor, t: Tensor) -> Tensor:
    """The noise level of timesteps `t` (B,), float64 on the CPU: `sigmas[t]` at integer t; at the fractional t of
    the SDE / ODE samplers, log sigma interpolated linearly between floor(t) and ceil(t), the inverse of the
    timestep those samplers compute from sigma (`continuous.DiscreteSigmaDenoiser.sigma_to_t`)."""
    t = t.detach().to("cpu", torch.float64).clamp(0, sigmas.numel() - 1)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    log_sigmas = sigmas.log()
    interpolated = ((1.0 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    return torch.where(w == 0, sigmas[low], interpolated)  # exactly sigma_t at integer t


def check_interval(interval: Sequence[float]) -> tuple[float, float]:
    """(sigma_lo, sigma_hi) as floats; a ValueError unless 0 <= sigma_lo <= sigma_hi."""
    if len(interval) != 2:
        raise ValueError(f"a guidance interval is [sigma_lo, sigma_hi], got {list(interval)}")
    lo, hi = float(interval[0]), float(interval[1])
    if not 0.0 <= lo <= hi:
        raise ValueError(f"a guidance interval needs 0 <= sigma_lo <= sigma_hi, got [{lo}, {hi}]")
    return lo, hi


class ClassifierFreeGuidance:
    """`model(x_t, t, y)` with fixed labels `y` and guidance scale `guidance_scale` = s = 1 + w, as `model(x_t, t)`.

    The conditional and unconditional predictions come from ONE forward pass on the batch [x; x] with labels
    [y; null] (size 2B), as GLIDE's and diffusers' pipelines do. The mix is written s eps_c + (1 - s) eps_u so that
    s = 1 returns eps_c and s = 0 returns eps_u bit for bit; at those two scales the half of the batch that gets
    weight 0 is not computed at all. Output channels beyond the image's (a learned variance's v) are not guided:
    the conditional branch's are returned (as GLIDE does).

    `interval` (sigma_lo, sigma_hi) with the `schedule`: guidance only for the images whose noise level sigma_t
    (`timestep_sigma`) is in (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024, section 3), the conditional model
    alone for the others. A step wholly outside is one forward pass of size B; one wholly inside is exactly the
    guidance without an interval; a batch mixing both (samplers give every image the same t, so only a caller of
    its own) is one pass of size B plus the images inside. None: guidance at every noise level.
    """

    def __init__(
        self,
        model: ConditionalDenoiser,
        labels: Tensor,
        guidance_scale: float,
        null_label: int,
        interval: Sequence[float] | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> None:
        self.model = model
        self.labels = labels
        self.guidance_scale = float(guidance_scale)
        self.null_label = int(null_label)
        self.interval = None if interval is None else check_interval(interval)
        if self.interval is not None and schedule is None:
            raise ValueError("a guidance interval is in noise levels sigma_t: pass the schedule that defines them")
        self.sigmas = None if self.interval is None else vp_sigmas(schedule)

    def inside(self, t: Tensor) -> Tensor:
        """Whether each timestep's noise level is in the interval, (B,) bool on t's device (all True without one)."""
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        sigma = timestep_sigma(self.sigmas, t)
        lo, hi = self.interval
        return ((sigma > lo) & (sigma <= hi)).to(t.device)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        y = self._labels(x_t)
        s = self.guidance_scale
        if s == 1.0:
            return self._positive(x_t, t, y)
        if self.interval is not None:
            inside = self.inside(t)
            if not bool(inside.any()):
                return self._positive(x_t, t, y)  # the conditional model alone: one evaluation
            if not bool(inside.all()):
                return self._guide_some(x_t, t, y, inside)
        if s == 0.0:
            return self._negative(x_t, t, y)
        cond, uncond = self._both(x_t, t, y)
        channels = x_t.shape[1]
        eps = s * cond[:, :channels] + (1.0 - s) * uncond[:, :channels]
        return torch.cat([eps, cond[:, channels:]], dim=1)

    def _labels(self, x_t: Tensor) -> Tensor:
        y = self.labels.to(x_t.device)
        if y.shape != x_t.shape[:1]:
            raise ValueError(f"need one label per image: {tuple(y.shape)} labels for {x_t.shape[0]} images")
        return y

    # The two branches: the conditional model, and the one guidance extrapolates away from (here the same network
    # with the null label; `AutoGuidance` overrides these three with a weaker model of its own).
    def _positive(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x_t, t, y)

    def _negative(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x_t, t, torch.full_like(y, self.null_label))

    def _both(self, x_t: Tensor, t: Tensor, y: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The positive branch for every image and the negative one for the images `index` (None: all), from one
        forward pass on [x; x[index]] with labels [y; null]."""
        x_n, t_n, y_n = (x_t, t, y) if index is None else (x_t[index], t[index], y[index])
        out = self.model(
            torch.cat([x_t, x_n]), torch.cat([t, t_n]), torch.cat([y, torch.full_like(y_n, self.null_label)])
        )
        return out[: x_t.shape[0]], out[x_t.shape[0] :]

    def _guide_some(self, x_t: Tensor, t: Tensor, y: Tensor, inside: Tensor) -> Tensor:
        """Guidance for the images `inside` only: the negative branch evaluated for those images alone."""
        s, channels = self.guidance_scale, x_t.shape[1]
        index = inside.nonzero().squeeze(1)
        cond, uncond = self._both(x_t, t, y, index)
        guided = cond.clone()
        guided[index, :channels] = s * cond[index, :channels] + (1.0 - s) * uncond[:, :channels]
        return guided


class AutoGuidance(ClassifierFreeGuidance):
    """Autoguidance (Karras et al. 2024, eq. 2): `model` extrapolated away from a weaker `guide` of the same task,
    D~ = D_guide + s (D_model - D_guide) = s D_model + (1 - s) D_guide, as `model(x_t, t)`.

    Both are called with the same `labels` (None: unconditional models, called as `net(x_t, t)`); outputs are mixed in
    whatever target both predict (eps, x0, v or edm: the mix is affine, so it commutes with the conversions, given the
    same schedule). Two networks cannot share a forward pass: every guided step is two evaluations, of the model and of
    the (usually smaller) guide. `interval` and the scale conventions are ClassifierFreeGuidance's: s = 1 is the model
    alone, s = 0 the guide alone. Output channels beyond the image's (a learned variance) come from the model.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        guide: Callable[..., Tensor],
        labels: Tensor | None,
        guidance_scale: float,
        interval: Sequence[float] | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> None:
        super().__init__(model, labels, guidance_scale, -1, interval, schedule)
        self.guide = guide

    def _labels(self, x_t: Tensor) -> Tensor | None:
        # Labels (B,), or the image a concat-conditioned net reads beside x_t (B, C, H, W): one per image either way.
        if self.labels is None:
            return None
        y = self.labels.to(x_t.device)
        if y.shape[0] != x_t.shape[0]:
            raise ValueError(f"need one label or condition per image: {tuple(y.shape)} for {x_t.shape[0]} images")
        return y

    @staticmethod
    def _call(net: Callable[..., Tensor], x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return net(x_t, t) if y is None else net(x_t, t, y)

    def _positive(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return self._call(self.model, x_t, t, y)

    def _negative(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return self._call(self.guide, x_t, t, y)

    def _both(self, x_t: Tensor, t: Tensor, y: Tensor | None, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_n, t_n, y_n = (x_t, t, y) if index is None else (x_t[index], t[index], None if y is None else y[index])
        return self._positive(x_t, t, y), self._negative(x_n, t_n, y_n)


def classifier_free_guidance(
    model: ConditionalDenoiser,
    labels: Tensor,
    guidance_scale: float | None = None,
    null_label: int | None = None,
    w: float | None = None,
    interval: Sequence[float] | None = None,
    schedule: NoiseSchedule | None = None,
) -> ClassifierFreeGuidance:
    """The guided denoiser `(x_t, t) -> (1 + w) eps(x_t, t, y) - w eps(x_t, t, null)`.

    Give either `guidance_scale` (s = 1 + w, diffusers' convention) or `w` (Ho & Salimans' weight).
    `null_label` defaults to `model.num_classes` (our UNet's null row). `interval` = (sigma_lo, sigma_hi) with the
    `schedule`: guidance only where sigma_t is in (sigma_lo, sigma_hi], the conditional model elsewhere
    (`ClassifierFreeGuidance`).
    """
    if (guidance_scale is None) == (w is None):
        raise ValueError("give exactly one of guidance_scale (= 1 + w) and w")
    if guidance_scale is None:
        guidance_scale = guidance_scale_from_w(w)
    if null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("null_label not given and the model has no num_classes attribute")
    return ClassifierFreeGuidance(model, labels, guidance_scale, null_label, interval, schedule)


class ClassifierGuidance:
    """Classifier guidance for DDIM-type samplers (Dhariwal & Nichol 2021, Algorithm 2, eq. 14):

        eps^(x_t, t) = eps_theta(x_t, t) - sqrt(1 - a_t) s grad_{x_t} log p_phi(y | x_t, t)

    `classifier(x_t, t) -> logits (B, num_classes)` is a noise-conditioned classifier (`src.models.classifier`),
    `model` any denoiser `(x_t, t) -> eps` (possibly itself conditional via `ClassifierFreeGuidance`). Because the
    score is -eps / sqrt(1 - a_t), this adds s grad log p_phi(y | x_t) to the score, i.e. samples from
    p(x_t) p_phi(y | x_t)^s; with the ancestral DDPM sampler it equals Algorithm 1's mean shift s Sigma g to first
    order. Extra output channels (learned variance) are passed through.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        classifier: Callable[[Tensor, Tensor], Tensor],
        labels: Tensor,
        classifier_scale: float,
        schedule: NoiseSchedule,
    ) -> None:
        self.model = model
        self.classifier = classifier
        self.labels = labels
        self.classifier_scale = float(classifier_scale)
        self.schedule = schedule

    def grad_log_prob(self, x_t: Tensor, t: Tensor) -> Tensor:
        """grad_{x_t} log p_phi(y | x_t, t), one gradient per image (the log-probabilities are summed over the
        batch, which does not mix images since each depends only on its own x_t)."""
        # Lightning runs predict, validate and test under torch.inference_mode(), where enable_grad() alone does
        # nothing and tensors made there ("inference tensors") cannot take part in autograd: leave inference mode
        # for this gradient and work on clones made outside it (the classifier's weights must not be inference
        # tensors either: load it outside inference mode).
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            t, labels = t.clone(), self.labels.to(x.device).clone()
            logits = self.classifier(x, t)
            # log-softmax in at least float32 (half-precision logits under autocast lose the small differences).
            log_probs = torch.log_softmax(
                logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1
            )
            selected = log_probs[torch.arange(x.shape[0], device=x.device), labels]
            grad = torch.autograd.grad(selected.sum(), x)[0].to(x_t.dtype)
        return grad

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.model(x_t, t)
        if self.classifier_scale == 0.0:
            return out
        channels = x_t.shape[1]
        schedule = self.schedule if self.schedule.betas.device == x_t.device else self.schedule.to(x_t.device)
        sigma = schedule.alpha_sigma(t, x_t)[1]  # sqrt(1 - a_t); interpolated at the continuous samplers' fractional t
        eps = out[:, :channels] - sigma * self.classifier_scale * self.grad_log_prob(x_t, t)
        return torch.cat([eps, out[:, channels:]], dim=1)
