"""Every loss in closed form: numbers worked out by hand in the comments, not by the code under test.

Standard pair unless said otherwise: policy (chosen, rejected) = (-1, -3), reference = (-2, -2), so the
log-ratios are c = +1, r = -1 and h = c - r = 2; completion lengths 2 (chosen) and 4 (rejected).
Constants: log sigma(1) = -0.313261687518, log sigma(-1) = -1.313261687518, sigma(0.5) = 0.622459331202.
"""

import math

import pytest
import torch

from dpokit.losses import LOSSES, PairLogps, UnpairedLogps, combine, compute_loss, preference_logits

D = torch.float64


def std_pair(requires_grad=False) -> PairLogps:
    t = lambda v: torch.tensor([v], dtype=D, requires_grad=requires_grad)  # noqa: E731
    gap = torch.tensor([1.5], dtype=D)  # score_chosen - score_rejected (REBEL)
    return PairLogps(t(-1.0), t(-3.0), t(-2.0), t(-2.0), torch.tensor([2]), torch.tensor([4]), gap)


PARAMS = {
    "beta": 0.5,
    "label_smoothing": 0.0,
    "f_divergence": "reverse_kl",
    "f_alpha": 1.0,
    "discopop_tau": 0.05,
    "simpo_gamma": 0.5,
    "orpo_lambda": 0.1,
    "cpo_alpha": 1.0,
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
    "bco_delta": 0.0,
}


def loss_of(name, x=None, **overrides):
    return compute_loss(name, x or std_pair(), {**PARAMS, **overrides})


# name, parameter overrides, expected loss, with the hand derivation
CLOSED_FORM = [
    # -log sigma(beta h) = -log sigma(1) = log(1 + e^-1)
    ("sigmoid", {}, 0.31326168751822286),
    # cDPO eps=0.1: 0.9 log(1+e^-1) + 0.1 log(1+e^1) = log(1+e^-1) + 0.1 * 1  (log(1+e^x) - log(1+e^-x) = x)
    ("sigmoid", {"label_smoothing": 0.1}, 0.41326168751822285),
    # robust eps=0.1: (0.9 * 0.313261687518 - 0.1 * 1.313261687518) / 0.8
    ("robust", {"label_smoothing": 0.1}, 0.1882616875182229),
    # hinge, beta=0.25: max(0, 1 - 0.25 * 2) = 0.5
    ("hinge", {"beta": 0.25}, 0.5),
    # exo eps=0.1, z=1: sigma(1)(log sigma(1) - log 0.9) + sigma(-1)(log sigma(-1) - log 0.1)
    ("exo_pair", {"label_smoothing": 0.1}, 0.11408210766749785),
    # ipo: averaged ratios c/2 = 0.5, r/4 = -0.25 -> (0.75 - 1/(2*0.5))^2 = 0.0625
    ("ipo", {}, 0.0625),
    # rebel: (beta h - (s_w - s_l))^2 = (0.5 * 2 - 1.5)^2
    ("rebel", {}, 0.25),
    # length-normalized DPO: -log sigma(0.5 * 0.75)
    ("sigmoid_norm", {}, 0.52312326413984),
    # nca: -log sigma(0.5) - 0.5 log sigma(-0.5) - 0.5 log sigma(0.5)
    ("nca_pair", {}, 1.1981539683602134),
    # bco, delta 0.2: -log sigma(0.5 - 0.2) - log sigma(-(-0.5 - 0.2))
    ("bco_pair", {"bco_delta": 0.2}, 0.9575412933539851),
    # sppo_hard, beta=1: (1 - 0.5)^2 + (-1 + 0.5)^2
    ("sppo_hard", {"beta": 1.0}, 0.5),
    # apo_zero: 1 - sigma(0.5) + sigma(-0.5) = 2 * 0.377540668798
    ("apo_zero", {}, 0.7550813375962908),
    # apo_down: sigma(0.5) + 1 - sigma(0.5 * 2)
    ("apo_down", {}, 0.8914007525718496),
    # discopop, z = 1, tau = 0.05: m = sigma(20) ~ 1 - 2.06e-9, so L ~ e^-1
    ("discopop", {}, 0.3678794410588668),
    # simpo, beta=2, gamma=0.5: 2 * (-1/2 - (-3/4)) - 0.5 = 0 -> ln 2
    ("simpo", {"beta": 2.0}, math.log(2)),
    # orpo: p_w = -0.5, p_l = -0.75, odds(p) = p - log(1 - e^p); 0.5 - 0.1 log sigma(odds_w - odds_l)
    ("orpo", {}, 0.5457912733313327),
    # cpo: -log sigma(0.5 * (-1 + 3)) + 1.0 * (1/2)
    ("cpo", {}, 0.8132616875182229),
    # sft: -(-1) / 2
    ("sft", {}, 0.5),
]


@pytest.mark.parametrize(
    "name, overrides, expected", CLOSED_FORM, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CLOSED_FORM)]
)
def test_closed_form(name, overrides, expected):
    assert loss_of(name, **overrides).losses.item() == pytest.approx(expected, abs=1e-12)


def test_every_registered_loss_has_a_closed_form_test_and_a_cited_docstring():
    tested = {n for n, _, _ in CLOSED_FORM} | {"aot", "aot_unpaired", "kto", "apo_zero_unpaired"}
    tested |= {"bradley_terry"}  # on reward-model scores: tests/test_reward_model.py
    assert tested == set(LOSSES)
    for name, spec in LOSSES.items():
        assert "arXiv:" in spec.fn.__doc__, name


def test_aot_sorts_gaps_across_the_batch():
    # pair 1: policy gap -1 - (-3) = 2, ref gap 0;  pair 2: policy (-2, -1) gap -1, ref (-1, -3) gap 2.
    # sorted policy gaps [-1, 2], sorted ref gaps [0, 2] -> deltas [-1, 0], beta 1:
    # losses [-log sigma(-1), -log sigma(0)] = [1.313261687518, ln 2]
    x = PairLogps(
        *(torch.tensor(v, dtype=D) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -1.0], [-2.0, -3.0]))
    )
    out = compute_loss("aot", x, {**PARAMS, "beta": 1.0})
    assert out.losses.tolist() == pytest.approx([1.3132616875182228, math.log(2)], abs=1e-12)
    # unpaired AOT sorts c = [1, -1] and r = [-3 + 2, -1 + 3] = [-1, 2] separately:
    # sorted c [-1, 1], sorted r [-1, 2] -> deltas [0, -1] -> [ln 2, 1.313261687518]
    out = compute_loss("aot_unpaired", x, {**PARAMS, "beta": 1.0})
    assert out.losses.tolist() == pytest.approx([math.log(2), 1.3132616875182228], abs=1e-12)


@pytest.mark.parametrize(
    "divergence, alpha, expected",
    [
        ("reverse_kl", 1.0, 0.31326168751822286),  # h = c - r = 2
        ("forward_kl", 1.0, 0.26907771988202195),  # h = e^{-r} - e^{-c} = e - 1/e; -log sigma(0.5 h)
        ("js_divergence", 1.0, 0.47407698418010663),  # h = 2 - (softplus(1) - softplus(-1)) = 1
        ("alpha_divergence", 0.5, 0.30208873215374477),  # h = (e^{0.5} - e^{-0.5}) / 0.5
    ],
)
def test_f_divergences(divergence, alpha, expected):
    assert loss_of("sigmoid", f_divergence=divergence, f_alpha=alpha).losses.item() == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_margin_is_zero_at_initialization(divergence):
    v = torch.tensor([-3.0, -7.0], dtype=D)
    assert torch.allclose(
        preference_logits(PairLogps(v, v - 1, v.clone(), v - 1), divergence, 0.7), torch.zeros(2, dtype=D)
    )


def kto_batch(kl):
    # rho = policy - ref = [1, -1]; labels [desirable, undesirable]
    return UnpairedLogps(
        torch.tensor([-1.0, -3.0], dtype=D, requires_grad=True),
        torch.tensor([-2.0, -2.0], dtype=D),
        torch.tensor([True, False]),
        torch.tensor(kl, dtype=D),
    )


def test_kto_hand_worked():
    # z0 = 0.2, beta 0.5, w_D = 2: desirable 2 (1 - sigma(0.5 (1 - 0.2))), undesirable 1 - sigma(0.5 (0.2 + 1))
    out = compute_loss("kto", kto_batch(0.2), {**PARAMS, "desirable_weight": 2.0})
    assert out.losses.tolist() == pytest.approx([0.802624679775096, 0.3543436937742046], abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.5] and out.rejected_rewards.tolist() == [-0.5]
    # a negative KL estimate is clamped to 0: both 1 - sigma(0.5)
    out = compute_loss("kto", kto_batch(-3.0), PARAMS)
    assert out.losses.tolist() == pytest.approx([0.3775406687981454] * 2, abs=1e-12)


def test_apo_zero_unpaired_hand_worked():
    # desirable 1 - sigma(0.5), undesirable sigma(-0.5)
    out = compute_loss("apo_zero_unpaired", kto_batch(0.0), PARAMS)
    assert out.losses.tolist() == pytest.approx([0.3775406687981454] * 2, abs=1e-12)


# --- known limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_step_one_is_ln2_with_zero_rewards(eps):
    logps = torch.tensor([-12.5, -3.0, -40.0], dtype=D)
    x = PairLogps(logps, logps - 1, logps.clone(), logps - 1)
    out = compute_loss("sigmoid", x, {**PARAMS, "label_smoothing": eps})
    assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=D))
    assert torch.count_nonzero(out.chosen_rewards) == 0 and torch.count_nonzero(out.rejected_rewards) == 0


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_at_zero_margin(beta):
    v = torch.tensor([-5.0], dtype=D)
    x = PairLogps(v, v - 2, v.clone(), v - 2, torch.tensor([3]), torch.tensor([5]))
    assert loss_of("ipo", x, beta=beta).losses.item() == pytest.approx((1 / (2 * beta)) ** 2)


def test_rebel_minimum_is_the_kl_regularized_optimum():
    """On a toy space of 5 whole completions with free logits, REBEL over every pair of them (scores s)
    descends to pi_ref exp(s / beta) / Z, the maximizer of E[s] - beta KL(pi || pi_ref); DPO's loss on the
    same pairs (each pair's better-scored side as chosen) still falls there: hard labels ask for more."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(5, generator=g, dtype=D).log_softmax(0)
    s = torch.tensor([0.9, -0.3, 0.4, 0.0, -0.8], dtype=D)
    beta = 0.5
    i, j = zip(*[(a, b) if s[a] > s[b] else (b, a) for a in range(5) for b in range(a + 1, 5)], strict=True)
    i, j = list(i), list(j)
    theta = ref.clone().requires_grad_(True)

    def pairs(logits):
        logp = logits.log_softmax(0)
        return PairLogps(logp[i], logp[j], ref[i], ref[j], score_gap=s[i] - s[j])

    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = loss_of("rebel", pairs(theta), beta=beta).losses.sum()
        loss.backward()
        return loss

    opt.step(closure)
    want = (ref + s / beta).log_softmax(0)
    assert torch.allclose(theta.detach().log_softmax(0), want, atol=1e-8)
    at_optimum = theta.detach().clone().requires_grad_(True)
    loss_of("sigmoid", pairs(at_optimum), beta=beta).losses.sum().backward()
    assert at_optimum.grad.abs().max() > 1e-2


def test_sigmoid_without_smoothing_is_plain_dpo_and_robust_at_zero_too():
    g = torch.Generator().manual_seed(0)
    x = PairLogps(*(torch.randn(16, generator=g, dtype=D) * 5 for _ in range(4)))
    beta = 0.3
    for name in ("sigmoid", "robust"):
        out = compute_loss(name, x, {**PARAMS, "beta": beta})
        for i in range(16):
            h = (x.policy_chosen[i] - x.ref_chosen[i]) - (x.policy_rejected[i] - x.ref_rejected[i])
            assert out.losses[i].item() == pytest.approx(math.log1p(math.exp(-beta * h.item())), rel=1e-10)


def test_combination_is_the_weighted_sum():
    x = std_pair()
    out = combine(["sigmoid", "sft"], [1.0, 0.5], x, PARAMS)
    assert out.losses.item() == pytest.approx(0.31326168751822286 + 0.5 * 0.5, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)  # rewards of the first loss: beta * c


# --- gradient direction -----------------------------------------------------------------------------

# sign of dL/d(policy_chosen), dL/d(policy_rejected) at policy == reference: -1 = pushed up, +1 = pushed
# down, 0 = untouched. apo_down leaves the chosen side flat at initialization (its two terms cancel).
# DiscoPOP is not monotone at z = 0: with m = sigma(z / tau), dL/dz = m'(0) (1 - ln 2) - 1/4 - 1/2 and
# m'(0) = 1 / (4 tau) = 5 for tau = 0.05, so dL/dz = 0.784 > 0 (test_discopop_direction_away_from_zero).
DIRECTIONS = {name: (-1, 1) for name in LOSSES if not (LOSSES[name].unpaired or LOSSES[name].reward_model)}
DIRECTIONS.update(apo_down=(0, 1), sft=(-1, 0), discopop=(1, -1))


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_gradient_direction(name):
    t = lambda v: torch.tensor([v], dtype=D, requires_grad=True)  # noqa: E731
    gap = torch.tensor([1.0], dtype=D)  # the chosen scored higher (REBEL)
    x = PairLogps(t(-4.0), t(-4.0), t(-4.0), t(-4.0), torch.tensor([2]), torch.tensor([2]), gap)
    params = {**PARAMS, "label_smoothing": 0.1, "simpo_gamma": 0.0}
    compute_loss(name, x, params).losses.sum().backward()
    grads = [0.0 if g.grad is None else g.grad.item() for g in (x.policy_chosen, x.policy_rejected)]
    signs = tuple(0 if abs(g) < 1e-12 else int(math.copysign(1, g)) for g in grads)
    assert signs == DIRECTIONS[name]


def test_discopop_direction_away_from_zero():
    # at z = beta h = 1, m = sigma(20) ~ 1 and L ~ e^{-z}: dL/dz ~ -e^{-1} < 0, chosen pushed up
    x = std_pair(requires_grad=True)
    loss_of("discopop", x).losses.sum().backward()
    assert x.policy_chosen.grad.item() == pytest.approx(-0.5 * math.exp(-1), rel=1e-6)
    assert x.policy_rejected.grad.item() == pytest.approx(0.5 * math.exp(-1), rel=1e-6)


def test_kto_gradient_direction():
    x = kto_batch(0.0)
    compute_loss("kto", x, PARAMS).losses.sum().backward()
    assert x.policy.grad[0] < 0 < x.policy.grad[1]  # desirable pushed up, undesirable down


def test_rewards_are_detached():
    for name in LOSSES:
        if LOSSES[name].unpaired or LOSSES[name].reward_model:  # their own tests
            continue
        x = std_pair(requires_grad=True)
        out = loss_of(name, x, label_smoothing=0.1)
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad, name
