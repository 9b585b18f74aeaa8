"""The theory of SPEC §4 as numpy float64 functions over a whole schedule.

Equation numbers are those of Kosson et al. (seeds/002) unless marked [003] (Wang & Aitchison).
Conventions: `lrs` is the absolute LR eta_t of each step t = 0..T-1 (peak LR times the schedule);
`wd` is PyTorch AdamW's lambda, so the per-step decay is a_t = 1 - eta_t * lambda (Algorithm 1);
rho is the weight RMS ||W|| / sqrt(K C); b is the RMS of one normalized Adam update (about 1).
"""

from __future__ import annotations

import math

import numpy as np


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ----- simple RMS model (App. F.1) -----


def rms_model(lrs, wd: float, rho0: float, b: float = 1.0) -> np.ndarray:
    """Eq 30 (rolled out as eq 31): rho_{t+1}^2 = a_t^2 rho_t^2 + b^2 eta_t^2; returns rho_0..rho_T."""
    lrs = _arr(lrs)
    a2 = (1.0 - lrs * wd) ** 2
    rho2 = np.empty(len(lrs) + 1)
    rho2[0] = rho0**2
    for t in range(len(lrs)):  # a plain loop: exact for any schedule, 20k steps in a few ms
        rho2[t + 1] = a2[t] * rho2[t] + (b * lrs[t]) ** 2
    return np.sqrt(rho2)


def rms_constant_lr(t, lr: float, wd: float, rho0: float) -> np.ndarray:
    """Eq 32 (eq 37 when wd = 0): rho_t for a constant LR, closed form."""
    t = _arr(t)
    if wd == 0:
        return np.sqrt(rho0**2 + t * lr**2)
    a2 = (1.0 - lr * wd) ** 2
    return np.sqrt(rho0**2 * a2**t + lr**2 * (1.0 - a2**t) / (1.0 - a2))


def momentum_update_rms(beta1: float) -> float:
    """b of one Adam step under momentum with uncorrelated gradients: sqrt((1 - beta1) / (1 + beta1)).

    Each gradient's total contribution over time still has RMS 1 (its impulse response sums to 1),
    so the norm growth of eq 30 keeps b = 1 while the per-step relative update of eq 35 scales by this.
    """
    return math.sqrt((1.0 - beta1) / (1.0 + beta1))


def equilibrium_rms(lr: float, wd: float, exact: bool = False) -> float:
    """Eq 33: rho_inf = eta / sqrt(1 - a^2), about sqrt(eta / (2 lambda)); inf without weight decay."""
    return decay_equilibrium_rms(lr, lr * wd, exact)


def decay_equilibrium_rms(lr: float, decay: float, exact: bool = False) -> float:
    """Eq 33 in terms of the per-step decay d = 1 - a (eta lambda for PyTorch's AdamW, whatever the optimizer
    applies otherwise): eta / sqrt(1 - (1 - d)^2), about eta / sqrt(2 d); inf without decay."""
    if decay <= 0:
        return math.inf
    return lr / math.sqrt(1.0 - (1.0 - decay) ** 2) if exact else lr / math.sqrt(2.0 * decay)


def relative_updates(lrs, rho, b: float = 1.0) -> np.ndarray:
    """Eq 35: ||dW_t|| / ||W_t|| = b eta_t / rho_t (gradient part, weight decay excluded)."""
    lrs = _arr(lrs)
    return b * lrs / _arr(rho)[: len(lrs)]


def equilibrium_relative_update(lr: float, wd: float) -> float:
    """Eq 36: the relative update in equilibrium, sqrt(2 eta lambda - eta^2 lambda^2) ~ sqrt(2 eta lambda)."""
    return decay_relative_update(lr * wd)


def decay_relative_update(decay: float) -> float:
    """Eq 36 in terms of the per-step decay d: eta / rho_inf = sqrt(1 - (1 - d)^2) = sqrt(2 d - d^2)."""
    return math.sqrt(1.0 - (1.0 - decay) ** 2)


def time_to_equilibrium(lr: float, wd: float, rho0: float) -> float:
    """Eq 34: steps until rho_t^2 is within a factor sqrt(2) of rho_inf^2 (constant LR; 0 if it starts there)."""
    return decay_time_to_equilibrium(lr, lr * wd, rho0)


def decay_time_to_equilibrium(lr: float, decay: float, rho0: float) -> float:
    """Eq 34 in terms of the per-step decay d = eta lambda; inf without decay.

    From eq 33 with a^2t ~ exp(-2 d t); the cases of eq 34 follow the sign of its logarithms.
    """
    if decay <= 0:
        return math.inf
    r2 = rho0**2 / decay_equilibrium_rms(lr, decay, exact=True) ** 2
    k = 1.0 / (2.0 * decay)
    if r2 < 1.0 / math.sqrt(2.0):
        return k * math.log((1.0 - r2) / (1.0 - 1.0 / math.sqrt(2.0)))
    if r2 > math.sqrt(2.0):
        return k * math.log((r2 - 1.0) / (math.sqrt(2.0) - 1.0))
    return 0.0


# ----- warmup effect of (eta/m, m lambda) vs (eta, lambda) (App. F.3) -----


def warmup_effect(lrs, wd: float, m: float, rho0: float) -> np.ndarray:
    """Eq 38 via eq 30 for any schedule: s_t = (eta_t/m / rho^_t) / (eta_t / rho_t), same rho_0."""
    lrs = _arr(lrs)
    rho = rms_model(lrs, wd, rho0)[:-1]
    rho_hat = rms_model(lrs / m, wd * m, rho0)[:-1]
    return rho / (m * rho_hat)


def warmup_effect_constant(t, lr: float, wd: float, m: float, rho0: float) -> np.ndarray:
    """Eq 39: the closed form of s_t for a constant LR; 1/m at t = 0, tending to 1."""
    a2t = (1.0 - lr * wd) ** (2.0 * _arr(t))
    r2 = rho0**2 / equilibrium_rms(lr, wd, exact=True) ** 2  # rho0^2 / rho_inf^2, exact eq 33
    return np.sqrt((1.0 + (r2 - 1.0) * a2t) / (1.0 + (m * m * r2 - 1.0) * a2t))


# ----- update alignment of the single-neuron noise model (App. E) -----


def update_alignment(C, B, phi) -> np.ndarray:
    """Eq 27: E[alpha_dW] for fan-in C, batch B and gradient signal-to-noise ratio phi (eq 18)."""
    C, B, phi = _arr(C), _arr(B), _arr(phi)
    num = (C + 2) + (B - 1) + (1 + B) ** 2 * phi + phi * (B - 1) + B**2 * phi**2 * (C + 2) + 2 * B * phi * C
    return np.sqrt(num / ((1 + B * phi) * (1 + phi) * C * B))


def update_alignment_approx(C, B, phi) -> np.ndarray:
    """Eq 28: sqrt(1/C + 1/B + phi / (1 + phi)), the closed-form approximation of eq 27."""
    C, B, phi = _arr(C), _arr(B), _arr(phi)
    return np.sqrt(1.0 / C + 1.0 / B + phi / (1.0 + phi))


def update_alignment_mc(C: int, B: int, phi: float, trials: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Monte-Carlo of the noise model (eqs 16-22): (mean of alpha, sqrt of the ratio of expectations, eq 23).

    x_b = (x~_b + sqrt(phi) s / y'_b) / sqrt(1 + phi), y'_b = +-1, dw = -mean_b(y'_b x_b).
    """
    rng = np.random.default_rng(seed)
    x_noise = rng.standard_normal((trials, B, C))
    s = rng.standard_normal((trials, 1, C))
    y = rng.choice([-1.0, 1.0], size=(trials, B, 1))
    X = (x_noise + math.sqrt(phi) * s / y) / math.sqrt(1.0 + phi)  # (trials, B, C)
    dw = -(y * X).mean(axis=1)  # (trials, C)
    dy2 = (np.einsum("nbc,nc->nb", X, dw) ** 2).sum(axis=1)  # ||dw^T X||^2
    dw2, x2 = (dw**2).sum(axis=1), (X**2).sum(axis=(1, 2))
    alpha = np.sqrt(dy2 / (dw2 * x2))
    return float(alpha.mean()), float(math.sqrt(dy2.mean() / (dw2.mean() * x2.mean())))


# ----- AdamW as an EMA ([003]) -----


def iters_per_epoch(dataset_tokens: float, tokens_per_step: float) -> float:
    """M: optimizer steps per pass over the data ([003] eq 8)."""
    return dataset_tokens / tokens_per_step


def ema_timescale(lr: float, wd: float) -> float:
    """[003] eq 6: tau_iter = 1 / (eta lambda) (inf without decay)."""
    return decay_timescale(lr * wd)


def decay_timescale(decay: float) -> float:
    """[003] eq 6 in terms of the per-step decay: tau_iter = 1 / d (inf without decay)."""
    return 1.0 / decay if decay > 0 else math.inf


def schedule_timescales(lrs, wd: float, iters_per_epoch: float | None = None) -> dict[str, float]:
    """Initial (at the peak LR) and final (last step) EMA timescales of a schedule, as in [003] Table 1.

    Returns tau_iter_init, tau_iter_final and, with M given, tau_epoch_init, tau_epoch_final (eq 8).
    """
    lrs = _arr(lrs)
    out = {"tau_iter_init": ema_timescale(float(lrs.max()), wd), "tau_iter_final": ema_timescale(float(lrs[-1]), wd)}
    if iters_per_epoch:
        out["tau_epoch_init"] = out["tau_iter_init"] / iters_per_epoch
        out["tau_epoch_final"] = out["tau_iter_final"] / iters_per_epoch
    return out
