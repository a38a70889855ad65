"""Loss functions in closed form: numbers worked out by hand, not by the code under test."""

import math

import pytest
import torch

from dpokit.losses import LOSSES, PairLogps, compute_loss, sigmoid


def pair(pc, pr, rc, rr, requires_grad=False):
    t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(rc), t(rr))


def test_sigmoid_hand_worked():
    # log-ratios: chosen -1 - (-2) = +1, rejected -3 - (-2) = -1, so h = 2; beta = 0.5 -> beta * h = 1.
    # L = -log sigmoid(1) = log(1 + e^-1) = 0.313261687518...
    out = sigmoid(pair(-1.0, -3.0, -2.0, -2.0), beta=0.5)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_conservative_dpo_hand_worked():
    # eps = 0.1: L = 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1); log(1+e^x) - log(1+e^-x) = x,
    # so L = log(1 + e^-1) + 0.1 * 1 = 0.413261687518...
    out = sigmoid(pair(-1.0, -3.0, -2.0, -2.0), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.41326168751822285, abs=1e-12)


def test_sigmoid_matches_independent_formula():
    g = torch.Generator().manual_seed(0)
    x = PairLogps(*(torch.randn(16, generator=g, dtype=torch.float64) * 5 for _ in range(4)))
    beta = 0.3
    out = sigmoid(x, beta=beta)
    for i in range(16):
        h = (x.policy_chosen[i] - x.ref_chosen[i]) - (x.policy_rejected[i] - x.ref_rejected[i])
        expected = math.log1p(math.exp(-beta * h.item()))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_step_one_is_ln2_with_zero_rewards(eps):
    logps = torch.tensor([-12.5, -3.0, -40.0], dtype=torch.float64)
    x = PairLogps(logps, logps - 1, logps.clone(), logps - 1)  # policy == reference
    out = sigmoid(x, beta=0.1, label_smoothing=eps)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert torch.count_nonzero(out.chosen_rewards) == 0 and torch.count_nonzero(out.rejected_rewards) == 0


def test_gradient_pushes_chosen_up_and_rejected_down():
    x = pair(-5.0, -5.0, -5.0, -5.0, requires_grad=True)
    sigmoid(x, beta=0.1).losses.sum().backward()
    # dL/d(policy_chosen) = -beta * sigmoid(-beta*h) = -0.05 at h = 0; the rejected side is the mirror.
    assert x.policy_chosen.grad.item() == pytest.approx(-0.05)
    assert x.policy_rejected.grad.item() == pytest.approx(0.05)
    assert x.ref_chosen.grad.item() == pytest.approx(0.05)  # the reference enters with the opposite sign


def test_rewards_are_detached():
    x = pair(-1.0, -2.0, -1.5, -1.5, requires_grad=True)
    out = sigmoid(x, beta=0.1)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_registry_dispatch_uses_declared_params():
    x = pair(-1.0, -3.0, -2.0, -2.0)
    params = {"beta": 0.5, "label_smoothing": 0.0, "type": "sigmoid", "unused": 123}
    assert compute_loss("sigmoid", x, params).losses.item() == pytest.approx(0.31326168751822286)
    assert LOSSES["sigmoid"].needs_reference
