"""The DDIM authors' reference code, copied: github.com/ermongroup/ddim, functions/denoising.py (`compute_alpha` and
`generalized_steps`, which runners/diffusion.py calls to sample).

The only change is that it is device-agnostic: the original's `xs[-1].to('cuda')` became `xs[-1]`. Everything else is
kept as it is, on purpose: the model is called with a *float* `t` (`torch.ones(n) * i`), the noise comes from the
global RNG through `torch.randn_like(x)` at every step (also where its coefficient is zero), and intermediate
states are moved to the CPU. Tests compare `src.diffusion.samplers` against this code, so do not "fix" it.
"""

import torch


def compute_alpha(beta, t):
    beta = torch.cat([torch.zeros(1).to(beta.device), beta], dim=0)
    a = (1 - beta).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)
    return a


def generalized_steps(x, seq, model, b, **kwargs):
    with torch.no_grad():
        n = x.size(0)
        seq_next = [-1] + list(seq[:-1])
        x0_preds = []
        xs = [x]
        for i, j in zip(reversed(seq), reversed(seq_next)):
            t = (torch.ones(n) * i).to(x.device)
            next_t = (torch.ones(n) * j).to(x.device)
            at = compute_alpha(b, t.long())
            at_next = compute_alpha(b, next_t.long())
            xt = xs[-1]
            et = model(xt, t)
            x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
            x0_preds.append(x0_t.to("cpu"))
            c1 = kwargs.get("eta", 0) * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
            c2 = ((1 - at_next) - c1**2).sqrt()
            xt_next = at_next.sqrt() * x0_t + c1 * torch.randn_like(x) + c2 * et
            xs.append(xt_next.to("cpu"))

    return xs, x0_preds
