"""Preference losses: pure functions of per-sequence log-probs, chosen from a registry.

Paired losses take a `PairLogps` (tensors of shape (P,)); unpaired ones (KTO family) take an
`UnpairedLogps` (shape (B,)). All take keyword hyper-parameters named after `loss.*` config fields and
return a `LossOutput`: per-example losses and detached implicit rewards as each loss defines them.
Stateful pieces (the BCO running reward mean, the KTO KL baseline) are computed by the caller and passed
in, so every function here stays pure. Imports only torch.

Notation: c = log pi(y_w|x) - log pi_ref(y_w|x), r = the same for y_l (summed over completion tokens),
h = c - r, |y| = completion length in tokens, sigma = logistic function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class PairLogps:
    policy_chosen: Tensor
    """(P,) log pi_theta(y_w | x), summed over completion tokens."""
    policy_rejected: Tensor
    """(P,) log pi_theta(y_l | x)."""
    ref_chosen: Tensor | None = None
    """(P,) log pi_ref(y_w | x); None for reference-free losses."""
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    """(P,) completion token counts."""
    rejected_lengths: Tensor | None = None
    score_gap: Tensor | None = None
    """(P,) score_chosen - score_rejected of each pair (the data's reward scores), for losses that regress
    on them (`needs_scores`); None when the data has none."""


@dataclass
class UnpairedLogps:
    policy: Tensor
    """(B,) log pi_theta(y | x) of each completion."""
    ref: Tensor
    """(B,) log pi_ref(y | x)."""
    labels: Tensor
    """(B,) bool, True = desirable."""
    kl: Tensor
    """() detached estimate of KL(pi_theta || pi_ref) from mismatched prompt/completion pairs (KTO's z0)."""
    lengths: Tensor | None = None


@dataclass
class RewardPairs:
    chosen: Tensor
    """(P,) the reward model's score of the chosen completions."""
    rejected: Tensor
    """(P,) its score of the rejected ones."""
    margin: Tensor
    """(P,) the margin the data asks the chosen to win by (a `margin` column; 0 without one)."""


@dataclass
class LossOutput:
    losses: Tensor
    """(P,) or (B,) per-example loss (differentiable)."""
    chosen_rewards: Tensor
    """Implicit rewards of the chosen (desirable) completions, detached."""
    rejected_rewards: Tensor
    """Implicit rewards of the rejected (undesirable) completions, detached."""


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOutput]
    params: tuple[str, ...]
    """Names of the `loss.*` config fields the function takes as keyword arguments."""
    needs_reference: bool = True
    unpaired: bool = False
    """Reads unpaired prompt/completion/label examples. Their reference log-probs cannot be precomputed:
    the KL baseline pairs each prompt with another example's completion of the same batch."""
    f_divergence: bool = False
    """Whether the loss is built on `preference_logits`, so `loss.f_divergence` applies."""
    needs_label_smoothing: bool = False
    """The loss is undefined at label_smoothing 0 (EXO's label distribution must not be 0/1)."""
    min_batch_size: int = 1
    """The smallest micro-batch the loss is defined on (KTO's KL baseline needs another example)."""
    reward_model: bool = False
    """Trains a reward model (`dpokit train-rm`): a scalar per completion, no policy log-probs."""
    needs_scores: bool = False
    """Reads each pair's score_chosen and score_rejected (PairLogps.score_gap): every pair must have both."""


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# --- shared pieces -------------------------------------------------------------------------------------


def _ratios(x: PairLogps) -> tuple[Tensor, Tensor]:
    return x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected


def _beta_rewards(c: Tensor, r: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return beta * c.detach(), beta * r.detach()


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the label-smoothed logistic loss on a margin z."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _capped_exp(v: Tensor, cap: float = 80.0) -> Tensor:
    return torch.exp(torch.clamp(v, max=cap))


def preference_logits(x: PairLogps, f_divergence: str = "reverse_kl", f_alpha: float = 1.0) -> Tensor:
    """The preference margin h under a chosen f-divergence regulariser (f-DPO, arXiv:2309.16240).

    reverse_kl: h = c - r (standard DPO)
    forward_kl: h = e^{-r} - e^{-c}                         (f(u) = -log u, f'(u) = -1/u)
    js_divergence: h = c - r - (softplus(c) - softplus(r))  (f'(u) = log(2u / (1 + u)))
    alpha_divergence: h = (e^{-alpha r} - e^{-alpha c}) / alpha   (f'(u) = (1 - u^-alpha) / alpha)
    """
    c, r = _ratios(x)
    if f_divergence == "reverse_kl":
        return c - r
    if f_divergence == "forward_kl":
        return _capped_exp(-r) - _capped_exp(-c)
    if f_divergence == "js_divergence":
        return (c - r) - (F.softplus(c) - F.softplus(r))
    if f_divergence == "alpha_divergence":
        return (_capped_exp(-f_alpha * r) - _capped_exp(-f_alpha * c)) / f_alpha
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.clamp(min=1).to(logps.dtype)


# --- DPO family on reference log-ratios ----------------------------------------------------------------


def sigmoid(
    x: PairLogps, *, beta: float, label_smoothing: float = 0.0, f_divergence="reverse_kl", f_alpha=1.0
):
    """DPO (arXiv:2305.18290, eq. 7); label_smoothing eps > 0 gives conservative DPO (cDPO).

        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    At initialization h = 0 and L = ln 2 whatever eps.
    """
    h = preference_logits(x, f_divergence, f_alpha)
    return LossOutput(_smoothed_sigmoid(beta * h, label_smoothing), *_beta_rewards(*_ratios(x), beta))


def robust(x: PairLogps, *, beta: float, label_smoothing: float, f_divergence="reverse_kl", f_alpha=1.0):
    """Robust DPO (arXiv:2403.00409, eq. 12): unbiased under label-flip rate eps.

    L = [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)
    """
    h = preference_logits(x, f_divergence, f_alpha)
    z = beta * h
    losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )
    return LossOutput(losses, *_beta_rewards(*_ratios(x), beta))


def hinge(x: PairLogps, *, beta: float, f_divergence="reverse_kl", f_alpha=1.0):
    """SLiC hinge loss on the DPO margin (arXiv:2305.10425): L = max(0, 1 - beta h)."""
    h = preference_logits(x, f_divergence, f_alpha)
    return LossOutput(torch.relu(1 - beta * h), *_beta_rewards(*_ratios(x), beta))


def exo_pair(x: PairLogps, *, beta: float, label_smoothing: float, f_divergence="reverse_kl", f_alpha=1.0):
    """EXO, pairwise (arXiv:2402.00856, eq. 16): reverse KL between the model's and the smoothed label
    distribution over (chosen, rejected):

        L = sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps),  z = beta h
    Needs 0 < eps < 0.5 (the label distribution must not be degenerate).
    """
    z = beta * preference_logits(x, f_divergence, f_alpha)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return LossOutput(losses, *_beta_rewards(*_ratios(x), beta))


def ipo(x: PairLogps, *, beta: float):
    """IPO (arXiv:2310.12036, eq. 17) on length-averaged log-ratios, as the authors specify:

        L = (c/|y_w| - r/|y_l| - 1/(2 beta))^2        (= (1/(2 beta))^2 at initialization)
    Rewards are beta times the averaged log-ratios.
    """
    c, r = _ratios(x)
    ca, ra = _per_token(c, x.chosen_lengths), _per_token(r, x.rejected_lengths)
    return LossOutput((ca - ra - 1 / (2 * beta)) ** 2, *_beta_rewards(ca, ra, beta))


def rebel(x: PairLogps, *, beta: float):
    """REBEL (arXiv:2404.16767, the least-squares step of Algorithm 1): regress the implicit reward gap on
    the pair's reward-score gap, s_w - s_l (score_chosen - score_rejected):

        L = (beta h - (s_w - s_l))^2        (= (s_w - s_l)^2 at initialization)
    Its minimum over all policies is pi_ref exp(s / beta) / Z, the policy that maximizes the mean score minus
    beta KL(pi || pi_ref): unlike DPO's hard labels, which reward a larger margin without end, the gap it
    asks for is finite, so training stops spending KL once the scores are matched.
    """
    c, r = _ratios(x)
    return LossOutput((beta * (c - r) - x.score_gap) ** 2, *_beta_rewards(c, r, beta))


def sigmoid_norm(x: PairLogps, *, beta: float, label_smoothing: float = 0.0):
    """Length-normalized DPO (Tulu 3, arXiv:2411.15124, eq. 6): DPO on per-token log-ratios.

    L = -log sigma(beta (c/|y_w| - r/|y_l|))
    """
    c, r = _ratios(x)
    ca, ra = _per_token(c, x.chosen_lengths), _per_token(r, x.rejected_lengths)
    return LossOutput(_smoothed_sigmoid(beta * (ca - ra), label_smoothing), *_beta_rewards(ca, ra, beta))


def nca_pair(x: PairLogps, *, beta: float):
    """NCA, pairwise (arXiv:2402.05369, eq. 11): absolute likelihoods, not only their difference.

    L = -log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r)
    """
    c, r = _ratios(x)
    zc, zr = beta * c, beta * r
    losses = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
    return LossOutput(losses, *_beta_rewards(c, r, beta))


def bco_pair(x: PairLogps, *, beta: float, bco_delta: Tensor | float = 0.0):
    """BCO, pairwise (arXiv:2404.04656, eq. 3): binary classification of each side against a baseline.

        L = -log sigma(beta c - delta) - log sigma(-(beta r - delta))
    delta = running mean of all rewards seen so far (kept by the caller, passed in detached).
    """
    c, r = _ratios(x)
    losses = -F.logsigmoid(beta * c - bco_delta) - F.logsigmoid(-(beta * r - bco_delta))
    return LossOutput(losses, *_beta_rewards(c, r, beta))


def sppo_hard(x: PairLogps, *, beta: float):
    """SPPO with hard win probabilities (arXiv:2405.00675, eq. 4.7 with P = 1 / 0):

    L = (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
    """
    c, r = _ratios(x)
    return LossOutput((c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2, *_beta_rewards(c, r, beta))


def aot(x: PairLogps, *, beta: float, label_smoothing: float = 0.0):
    """AOT, paired (arXiv:2406.05882): distributional dominance via sorted log-ratio gaps.

    Sort the policy gaps (pi_w - pi_l) and the reference gaps (ref_w - ref_l) across the batch separately;
        L_i = smoothed logistic(beta (sorted_policy_i - sorted_ref_i))
    """
    policy_gap, _ = torch.sort(x.policy_chosen - x.policy_rejected)
    ref_gap, _ = torch.sort(x.ref_chosen - x.ref_rejected)
    losses = _smoothed_sigmoid(beta * (policy_gap - ref_gap), label_smoothing)
    return LossOutput(losses, *_beta_rewards(*_ratios(x), beta))


def aot_unpaired(x: PairLogps, *, beta: float, label_smoothing: float = 0.0):
    """AOT, unpaired (arXiv:2406.05882): sort chosen and rejected log-ratios across the batch separately;

    L_i = smoothed logistic(beta (sorted_c_i - sorted_r_i))
    """
    c, r = _ratios(x)
    cs, _ = torch.sort(c)
    rs, _ = torch.sort(r)
    return LossOutput(_smoothed_sigmoid(beta * (cs - rs), label_smoothing), *_beta_rewards(c, r, beta))


def apo_zero(x: PairLogps, *, beta: float):
    """APO-zero (arXiv:2408.06266, eq. 7): chosen better than the model's own outputs.

    L = (1 - sigma(beta c)) + sigma(beta r)
    """
    c, r = _ratios(x)
    return LossOutput(1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r), *_beta_rewards(c, r, beta))


def apo_down(x: PairLogps, *, beta: float):
    """APO-down (arXiv:2408.06266, eq. 8): chosen worse than the model's outputs; push both down,
    rejected more.

        L = sigma(beta c) + (1 - sigma(beta (c - r)))
    """
    c, r = _ratios(x)
    return LossOutput(torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r)), *_beta_rewards(c, r, beta))


def discopop(x: PairLogps, *, beta: float, discopop_tau: float = 0.05):
    """DiscoPOP / log-ratio modulated loss (arXiv:2406.08414, eq. 5), z = beta h:

    m = sigma(z / tau);  L = (1 - m) (-log sigma(z)) + m e^{-z}
    """
    c, r = _ratios(x)
    z = beta * (c - r)
    m = torch.sigmoid(z / discopop_tau)
    return LossOutput((1 - m) * -F.logsigmoid(z) + m * torch.exp(-z), *_beta_rewards(c, r, beta))


# --- reference-free -----------------------------------------------------------------------------------


def simpo(x: PairLogps, *, beta: float, simpo_gamma: float, label_smoothing: float = 0.0):
    """SimPO (arXiv:2405.14734, eq. 6): average log-prob rewards and a target margin gamma, no reference.

    L = -log sigma(beta pi_w/|y_w| - beta pi_l/|y_l| - gamma)
    """
    ca = _per_token(x.policy_chosen, x.chosen_lengths)
    ra = _per_token(x.policy_rejected, x.rejected_lengths)
    z = beta * (ca - ra) - simpo_gamma
    return LossOutput(_smoothed_sigmoid(z, label_smoothing), *_beta_rewards(ca, ra, beta))


def orpo(x: PairLogps, *, orpo_lambda: float):
    """ORPO (arXiv:2403.07691, eqs. 6-7), with p = per-token average log-probs:

        log odds(y) = p(y) - log(1 - e^{p(y)})
        L = -p(y_w) - lambda log sigma(log odds(y_w) - log odds(y_l))
    Rewards are lambda times the averaged log-probs.
    """
    ca = _per_token(x.policy_chosen, x.chosen_lengths)
    ra = _per_token(x.policy_rejected, x.rejected_lengths)
    # log(1 - e^p) for p < 0; clamp keeps it finite when p -> 0 (a certain token).
    log_odds = (ca - ra) - (
        torch.log1p(-torch.exp(ca).clamp(max=1 - 1e-7)) - torch.log1p(-torch.exp(ra).clamp(max=1 - 1e-7))
    )
    losses = -ca - orpo_lambda * F.logsigmoid(log_odds)
    return LossOutput(losses, *_beta_rewards(ca, ra, orpo_lambda))


def cpo(x: PairLogps, *, beta: float, cpo_alpha: float, label_smoothing: float = 0.0):
    """CPO (arXiv:2401.08417, eq. 6): DPO without the reference plus a behaviour-cloning NLL term.

    L = -log sigma(beta (pi_w - pi_l)) + alpha * (-pi_w / |y_w|)
    """
    z = beta * (x.policy_chosen - x.policy_rejected)
    nll = -_per_token(x.policy_chosen, x.chosen_lengths)
    losses = _smoothed_sigmoid(z, label_smoothing) + cpo_alpha * nll
    return LossOutput(losses, *_beta_rewards(x.policy_chosen, x.policy_rejected, beta))


def sft(x: PairLogps):
    """Negative log-likelihood of the chosen completion per token: L = -pi_w / |y_w|.

    Combine with a preference loss for RPO (arXiv:2404.19733: sigmoid + alpha * sft) or MPO-style weighted
    lists. Rewards are the per-token average log-probs (no reference involved).
    """
    ca = _per_token(x.policy_chosen, x.chosen_lengths)
    ra = _per_token(x.policy_rejected, x.rejected_lengths)
    return LossOutput(-ca, ca.detach(), ra.detach())


# --- reward models ---------------------------------------------------------------------------------------


def bradley_terry(x: RewardPairs, *, center_rewards_coefficient: float = 0.0):
    """Bradley-Terry reward-model loss (InstructGPT, arXiv:2203.02155, eq. 1), with a per-pair margin as in
    Llama 2's reward models (arXiv:2307.09288, eq. 2), plus TRL's centering term that keeps scores near 0:

        L = -log sigma(r(x, y_w) - r(x, y_l) - margin) + c (r(x, y_w) + r(x, y_l))^2
    Rewards are the scores themselves.
    """
    losses = -F.logsigmoid(x.chosen - x.rejected - x.margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (x.chosen + x.rejected) ** 2
    return LossOutput(losses, x.chosen.detach(), x.rejected.detach())


# --- unpaired (KTO family) -------------------------------------------------------------------------


def _split_rewards(rewards: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return rewards[labels].detach(), rewards[~labels].detach()


def kto(x: UnpairedLogps, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (arXiv:2402.01306, eq. 8), with rho = log pi(y|x) - log pi_ref(y|x) and z0 = the KL baseline:

        desirable:   L = w_D (1 - sigma(beta (rho - z0)))
        undesirable: L = w_U (1 - sigma(beta (z0 - rho)))
    z0 is estimated from mismatched prompt/completion pairs of the batch, clamped at 0 and detached.
    """
    rho = x.policy - x.ref
    z0 = x.kl.detach().clamp(min=0)
    losses = torch.where(
        x.labels,
        desirable_weight * (1 - torch.sigmoid(beta * (rho - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho))),
    )
    return LossOutput(losses, *_split_rewards(beta * rho, x.labels))


def apo_zero_unpaired(x: UnpairedLogps, *, beta: float):
    """APO-zero for unpaired data (arXiv:2408.06266): desirable 1 - sigma(beta rho), undesirable sigma(beta rho)."""
    rho = x.policy - x.ref
    losses = torch.where(x.labels, 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho))
    return LossOutput(losses, *_split_rewards(beta * rho, x.labels))


_F = ("f_divergence", "f_alpha")
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, ("beta", "label_smoothing", *_F), f_divergence=True),
    "robust": LossSpec(robust, ("beta", "label_smoothing", *_F), f_divergence=True),
    "hinge": LossSpec(hinge, ("beta", *_F), f_divergence=True),
    "exo_pair": LossSpec(
        exo_pair, ("beta", "label_smoothing", *_F), f_divergence=True, needs_label_smoothing=True
    ),
    "ipo": LossSpec(ipo, ("beta",)),
    "rebel": LossSpec(rebel, ("beta",), needs_scores=True),
    "sigmoid_norm": LossSpec(sigmoid_norm, ("beta", "label_smoothing")),
    "nca_pair": LossSpec(nca_pair, ("beta",)),
    "bco_pair": LossSpec(bco_pair, ("beta", "bco_delta")),
    "sppo_hard": LossSpec(sppo_hard, ("beta",)),
    "aot": LossSpec(aot, ("beta", "label_smoothing")),
    "aot_unpaired": LossSpec(aot_unpaired, ("beta", "label_smoothing")),
    "apo_zero": LossSpec(apo_zero, ("beta",)),
    "apo_down": LossSpec(apo_down, ("beta",)),
    "discopop": LossSpec(discopop, ("beta", "discopop_tau")),
    "simpo": LossSpec(simpo, ("beta", "simpo_gamma", "label_smoothing"), needs_reference=False),
    "orpo": LossSpec(orpo, ("orpo_lambda",), needs_reference=False),
    "cpo": LossSpec(cpo, ("beta", "cpo_alpha", "label_smoothing"), needs_reference=False),
    "sft": LossSpec(sft, (), needs_reference=False),
    "kto": LossSpec(kto, ("beta", "desirable_weight", "undesirable_weight"), unpaired=True, min_batch_size=2),
    "bradley_terry": LossSpec(
        bradley_terry, ("center_rewards_coefficient",), needs_reference=False, reward_model=True
    ),
    "apo_zero_unpaired": LossSpec(apo_zero_unpaired, ("beta",), unpaired=True),
}


def compute_loss(name: str, x: PairLogps | UnpairedLogps, params: dict) -> LossOutput:
    """Run loss `name` with the hyper-parameters it declares, picked from `params` (the loss config)."""
    spec = LOSSES[name]
    return spec.fn(x, **{k: params[k] for k in spec.params})


def combine(names: list[str], weights: list[float], x: PairLogps | UnpairedLogps, params: dict) -> LossOutput:
    """Weighted sum of several losses (e.g. RPO = sigmoid + alpha * sft, MPO-style lists).

    The rewards reported are those of the first loss in the list.
    """
    outputs = [compute_loss(n, x, params) for n in names]
    total = sum(w * o.losses for w, o in zip(weights, outputs, strict=True))
    return LossOutput(total, outputs[0].chosen_rewards, outputs[0].rejected_rewards)
