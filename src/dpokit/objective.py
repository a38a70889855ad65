"""From a batch to a loss: reference and policy log-probs, token weighting (LD-DPO), pair weighting (WPO),
running state (the BCO reward baseline) and the unpaired KL baseline (KTO), then the registered losses.

The loss functions stay pure; everything stateful or model-dependent lives here.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from dpokit.batching import Batch, UnpairedBatch
from dpokit.config import LossConfig
from dpokit.logps import sum_by_sequence
from dpokit.losses import LOSSES, LossOutput, PairLogps, RewardPairs, UnpairedLogps, combine


class RunningMean:
    """BCO's reward baseline delta: the mean of every training micro-batch's mean reward so far."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, value: float) -> float:
        self.total += value
        self.count += 1
        return self.total / self.count

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0


def ld_token_weights(batch: Batch, alpha: float) -> torch.Tensor:
    """LD-DPO (arXiv:2409.06411, eq. 9): weight 1 on the first min(|y_w|, |y_l|) tokens of each completion,
    alpha on the tokens past the shorter completion's length."""
    P = batch.num_pairs
    if batch.seq_map is not None:
        raise ValueError("LD-DPO weights tokens per pair: lay pairs out with Layout(share_completions=False)")
    lengths = batch.completion_lengths()
    shared = torch.minimum(lengths[:P], lengths[P:])  # (P,)
    pair_of_token = batch.seq_index % P
    past = batch.completion_pos >= shared[pair_of_token]
    return torch.where(
        past, torch.full_like(past, alpha, dtype=torch.float32), torch.ones_like(past, dtype=torch.float32)
    )


class Objective:
    """Callable: (policy, reference, batch) -> (LossOutput, extras).

    `extras` maps metric names to per-example tensors to average: the policy log-probs of chosen and
    rejected completions, and the reference-drift measures of guards.py when a reference is used.
    """

    def __init__(self, cfg: LossConfig, reduce_mean=None):
        self.cfg = cfg
        self.names = list(cfg.type)
        self.weights = list(cfg.weights) or [1.0] * len(self.names)
        self.params = asdict(cfg)
        self.unpaired = LOSSES[self.names[0]].unpaired
        self.reward_model = LOSSES[self.names[0]].reward_model
        """Trains a reward model: the policy is a RewardScores, a score per sequence."""
        self.needs_reference = any(LOSSES[n].needs_reference for n in self.names)
        # a loss that takes `bco_delta` needs the running mean reward (BCO's baseline), kept here
        self.bco = RunningMean() if any("bco_delta" in LOSSES[n].params for n in self.names) else None
        self.reduce_mean = reduce_mean or (lambda t: t)  # averages a tensor over ranks

    def state_dict(self) -> dict:
        """Running state a resumed run must restore (the BCO reward baseline)."""
        return {"bco": [self.bco.total, self.bco.count] if self.bco else None}

    def load_state_dict(self, state: dict) -> None:
        if self.bco is not None and state.get("bco"):
            self.bco.total, self.bco.count = state["bco"]

    def __call__(
        self, policy, reference, batch: Batch | UnpairedBatch
    ) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        """`reference`: a `reference.Reference`, or None for reference-free losses."""
        if self.unpaired:
            return self.unpaired_loss(policy, reference, batch)
        if self.reward_model:
            return self.reward_loss(policy, batch)
        return self.pair_loss(policy, reference, batch)

    def reward_loss(self, model, batch: Batch):
        """A reward model's pair loss from its scores of chosen and rejected (logps.RewardScores)."""
        P = batch.num_pairs
        scores = model(*batch.reward_args)  # (S,)
        if batch.seq_map is not None:
            scores = scores[batch.seq_map]
        x = RewardPairs(scores[:P], scores[P:], batch.margins.to(scores.device))
        return combine(self.names, self.weights, x, self.params), {}

    def pair_loss(self, policy, reference, batch: Batch):
        P, cfg = batch.num_pairs, self.cfg
        token_w = ld_token_weights(batch, cfg.ld_alpha) if cfg.ld_alpha != 1.0 else None
        ref = reference.sequence_logps(batch, token_w) if self.needs_reference else None
        log_sum_sq = None
        if cfg.use_weighting:
            tok, log_sum_sq = policy(*batch.model_args, with_sq=True)
        else:
            tok = policy(*batch.model_args)
        seq = batch.sequence_sums(tok if token_w is None else tok * token_w)  # (2P,)
        lengths = batch.completion_lengths()
        x = PairLogps(
            policy_chosen=seq[:P],
            policy_rejected=seq[P:],
            ref_chosen=None if ref is None else ref[:P],
            ref_rejected=None if ref is None else ref[P:],
            chosen_lengths=lengths[:P],
            rejected_lengths=lengths[P:],
            score_gap=None if batch.score_gaps is None else batch.score_gaps.to(seq),
        )
        params = self.params
        if self.bco is not None:
            # only training batches move the baseline: evaluation reads it (it runs under no_grad)
            delta = self.bco.value
            if torch.is_grad_enabled():
                rewards = cfg.beta * torch.cat(
                    [x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected]
                )
                delta = self.bco.update(float(self.reduce_mean(rewards.detach().mean())))
            params = {**params, "bco_delta": delta}
        out = combine(self.names, self.weights, x, params)
        if log_sum_sq is not None:
            out.losses = out.losses * wpo_weights(tok, log_sum_sq, batch)
        extras = {"logps/chosen": x.policy_chosen.detach(), "logps/rejected": x.policy_rejected.detach()}
        if ref is not None:
            per_token = (seq.detach() - ref) / lengths.clamp(min=1)  # (2P,) log-ratio per token
            extras["drift/abs_logratio_per_token"] = per_token.abs()
            extras["drift/kl_chosen_per_token"] = per_token[:P]
            extras["logratio/chosen"] = x.policy_chosen.detach() - x.ref_chosen
            extras["logratio/rejected"] = x.policy_rejected.detach() - x.ref_rejected
        return out, extras

    def unpaired_loss(self, policy, reference, batch: UnpairedBatch):
        targets, mismatched = batch.targets, batch.mismatched
        ref = reference.sequence_logps(targets)
        pol = sum_by_sequence(policy(*targets.model_args), targets.seq_index, targets.num_seqs)
        with torch.no_grad():  # the KL baseline is a detached estimate (KTO, sec. 4.1)
            kl_pol = sum_by_sequence(
                policy(*mismatched.model_args), mismatched.seq_index, mismatched.num_seqs
            )
            kl = self.reduce_mean((kl_pol - reference.sequence_logps(mismatched)).mean())
        x = UnpairedLogps(pol, ref, targets.labels, kl, targets.completion_lengths())
        out = combine(self.names, self.weights, x, self.params)
        per_token = (pol.detach() - ref) / targets.completion_lengths().clamp(min=1)
        extras = {
            "logps/chosen": pol[targets.labels].detach(),
            "logps/rejected": pol[~targets.labels].detach(),
            "drift/abs_logratio_per_token": per_token.abs(),
            "kl": kl.reshape(1),
        }
        return out, extras


def wpo_weights(tok_logps: torch.Tensor, log_sum_sq: torch.Tensor, batch: Batch) -> torch.Tensor:
    """WPO (arXiv:2406.11827, eq. 2): w = min(1, exp(mean_t[log p_t - log sum_v p_v^2] over y_w + the same
    over y_l)), detached; the normaliser keeps w near 1 for outputs typical of the current policy."""
    P = batch.num_pairs
    per_seq = batch.sequence_sums((tok_logps - log_sum_sq).detach()) / batch.completion_lengths().clamp(min=1)
    return torch.exp(per_seq[:P] + per_seq[P:]).clamp(max=1.0)
