"""Training guards: catch the ways DPO goes wrong while it runs, and say what to change.

- reference drift: `drift/abs_logratio_per_token`, the mean over chosen and rejected completions of
  |log pi(y|x) - log pi_ref(y|x)| / |y| (nats per token), and `drift/kl_chosen_per_token`, the mean
  per-token log-ratio on the chosen completions (a KL estimate of pi against pi_ref on the data). A warning
  when the first passes `train.drift_warn` (default 1.0 nat per token: the policy then gives every token
  e times the reference's probability, or 1/e of it, on average);
- flat margins: a warning when the mean `rewards/margins` of the last `train.flat_window` steps is not
  above the mean of the window before by more than `train.flat_min_delta` ("no preference is learned");
- vanished gradient: a warning when the gradient norm is exactly 0 after the first step (a saturated
  network after a huge learning rate, or pairs with no signal);
- early stopping: stop when `eval/rewards/margins` has not improved by `eval.min_delta` for
  `eval.patience` evaluations; the best checkpoint is kept (rundir.Run.best_checkpoint).
Non-finite losses and gradients are caught in the loop itself (train.non_finite_message).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Guards:
    def __init__(
        self, drift_warn: float, flat_window: int, flat_min_delta: float, patience: int, min_delta: float
    ):
        self.drift_warn, self.flat_window, self.flat_min_delta = drift_warn, flat_window, flat_min_delta
        self.patience, self.min_delta = patience, min_delta
        self.margins: list[float] = []
        self.drift_warned = False
        self.zero_grad_warned = False
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stop_reason: str | None = None
        self.warnings: list[str] = []

    STATE = (
        "margins",
        "drift_warned",
        "zero_grad_warned",
        "best",
        "best_step",
        "bad_evals",
        "stop_reason",
        "warnings",
    )

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for k in self.STATE:
            setattr(self, k, state[k])

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def on_step(self, record: dict, beta: float, lr: float) -> None:
        if record.get("grad_norm") == 0.0 and record["step"] > 1 and not self.zero_grad_warned:
            self.zero_grad_warned = True
            self._warn(
                f"step {record['step']}: the gradient norm is 0: nothing is learned. After a too-large update the "
                f"network can saturate (train.lr={lr:g} far too high?); otherwise every pair may be identical "
                "(dpokit data check)."
            )
        drift = record.get("drift/abs_logratio_per_token")
        if drift is not None and drift > self.drift_warn and not self.drift_warned:
            self.drift_warned = True
            self._warn(
                f"step {record['step']}: reference drift {drift:.3f} nats/token > train.drift_warn={self.drift_warn}: "
                f"the policy is moving far from the reference. Lower train.lr (now {lr:g}) or raise loss.beta "
                f"(now {beta:g}) to keep it closer."
            )
        if "rewards/margins" in record:
            self.margins.append(record["rewards/margins"])
        w = self.flat_window
        if w and len(self.margins) >= 2 * w and len(self.margins) % w == 0:
            recent = sum(self.margins[-w:]) / w
            before = sum(self.margins[-2 * w : -w]) / w
            if recent - before <= self.flat_min_delta:
                self._warn(
                    f"step {record['step']}: rewards/margins is flat (mean {recent:+.4f} over the last {w} steps vs "
                    f"{before:+.4f} before): no preference is being learned. Check the data (dpokit data check: "
                    "pairs too similar?), raise train.lr, or lower loss.beta."
                )

    def on_eval(self, record: dict) -> bool:
        """Returns True when this evaluation is the best so far (save it as the best checkpoint)."""
        margin = record.get("eval/rewards/margins")
        if margin is None:
            return False
        if self.best is None or margin > self.best + self.min_delta:
            self.best, self.best_step, self.bad_evals = margin, record["step"], 0
            return True
        self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience:
            self.stop_reason = (
                f"early stopping at step {record['step']}: eval/rewards/margins did not improve by more than "
                f"{self.min_delta} for {self.patience} evaluations (best {self.best:+.4f} at step {self.best_step})"
            )
            log.warning(self.stop_reason)
        return False
