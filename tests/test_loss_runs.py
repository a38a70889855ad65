"""Every loss end to end through the CLI on a tiny model, combined losses, KTO on unpaired data (batches of
one label included), LD-DPO / WPO weighting, and bad combinations refused."""

import json
import math

import pytest
import torch

from dpokit.batching import Layout
from dpokit.cli import main
from dpokit.config import ConfigError, load_config
from dpokit.files import read_jsonl as read_metrics
from dpokit.losses import LOSSES
from dpokit.objective import ld_token_weights, wpo_weights
from dpokit.tokenize import TokenizedPair
from helpers import KTO_DEMO, cli_args

PAIRED = sorted(n for n, s in LOSSES.items() if not (s.unpaired or s.reward_model or s.needs_scores))
"""The paired losses that train on any pairs (builtin:demo has no scores: REBEL has its own test)."""
LN2 = math.log(2)
BETA, EPS = 0.1, 0.1
STEP1 = {
    # At step 1 the policy is the reference: every log-ratio c = r = 0, so each loss is a constant (beta 0.1,
    # label smoothing 0.1 where the loss takes it).
    "sigmoid": LN2,  # -(1 - eps) log s(0) - eps log s(0)
    "robust": LN2,  # [(1 - eps) ln 2 - eps ln 2] / (1 - 2 eps)
    "hinge": 1.0,  # max(0, 1 - 0)
    "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - EPS)) + 0.5 * (math.log(0.5) - math.log(EPS)),
    "ipo": (1 / (2 * BETA)) ** 2,  # (0 - 0 - 1/(2 beta))^2 = 25
    "sigmoid_norm": LN2,
    "nca_pair": 2 * LN2,  # -log s(0) - 0.5 log s(0) - 0.5 log s(0)
    "bco_pair": 2 * LN2,  # the running baseline of zero rewards is 0
    "sppo_hard": 2 * (0.5 / BETA) ** 2,  # (0 - 5)^2 + (0 + 5)^2
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,  # 1 - s(0) + s(0)
    "apo_down": 1.0,  # s(0) + 1 - s(0)
    "discopop": 0.5 * LN2 + 0.5,  # m = s(0) = 1/2: (1 - m) ln 2 + m e^0
}


def _logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def reference_free_step1(name: str, sc: float, lc: int, sr: float, lr: int) -> float:
    """The reference-free losses written out again in float64 (papers' equations) from one pair's summed
    log-probs `sc`, `sr` and completion lengths (gamma 0.5, lambda 0.1, alpha 1: the defaults)."""
    ac, ar = sc / lc, sr / lr
    if name == "simpo":
        return -_logsig(BETA * (ac - ar) - 0.5)
    if name == "orpo":
        log_odds = (ac - ar) - (math.log1p(-math.exp(ac)) - math.log1p(-math.exp(ar)))
        return -ac - 0.1 * _logsig(log_odds)
    if name == "cpo":
        return -_logsig(BETA * (sc - sr)) - 1.0 * ac
    assert name == "sft"
    return -ac


def start_logps(model_dir, max_length: int, max_prompt_length: int, limit: int):
    """(summed log-prob, length) of the chosen and rejected completion of each training pair under the
    starting model: one plain float64 forward per sequence, log-softmax, the completion's tokens gathered."""
    from transformers import AutoModelForCausalLM

    from dpokit.data import load_examples
    from dpokit.models import load_tokenizer
    from dpokit.tokenize import tokenize_pairs

    examples, _ = load_examples("builtin:demo")
    pairs, _ = tokenize_pairs(examples[:limit], load_tokenizer(str(model_dir)), max_length, max_prompt_length)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    out = []
    for p in pairs:
        row = []
        for completion in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + completion])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            n = len(p.prompt_ids)
            row += [sum(float(logp[n - 1 + t, c]) for t, c in enumerate(completion)), len(completion)]
        out.append(row)
    return out


def cli_run(tmp_path, model_dir, data, *overrides):
    args = cli_args(
        model_dir,
        tmp_path / "run",
        f"data.train={data}",
        "data.limit=16",
        "data.max_length=160",
        "data.max_prompt_length=80",
        "train.max_steps=2",
        *overrides,
    )
    assert main(args) == 0
    return read_metrics(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("name", PAIRED)
def test_each_paired_loss_starts_at_its_closed_form_and_learns(tmp_path, tiny_model_dir, name):
    """Every paired loss through the CLI on 16 pairs, each step the whole set: step 1's loss is the loss's
    closed form at the starting model (a constant for the DPO family; for the reference-free ones the
    formula written out again on float64 log-probs of the start), and after two updates the loss on the same
    pairs has fallen and their margin has grown (SFT and CPO: the chosen log-prob; DiscoPOP: the margin
    shrinks, see below)."""
    extra = [f"loss.label_smoothing={EPS}"] if name in ("exo_pair", "robust", "sigmoid") else []
    records = cli_run(
        tmp_path,
        tiny_model_dir,
        "builtin:demo",
        f"loss.type={name}",
        "data.eval_fraction=0",
        "train.batch_size=16",
        "train.max_steps=3",
        "train.lr=2e-3",
        *extra,
    )
    first, last = records[0], records[-1]
    assert [r["step"] for r in records] == [1, 2, 3]
    if name in STEP1:
        assert first["loss"] == pytest.approx(STEP1[name], abs=1e-6) and first["rewards/margins"] == 0
    else:
        rows = start_logps(tiny_model_dir, 160, 80, 16)
        want = sum(reference_free_step1(name, *row) for row in rows) / len(rows)
        assert first["loss"] == pytest.approx(want, abs=1e-4)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert last["loss"] < first["loss"]
    if name in ("sft", "cpo"):
        # CPO's preference term is saturated on these pairs (summed margin beta h = 49 at the start: the
        # rejected answers are the long ones), so what moves is its NLL term, as SFT's
        assert last["logps/chosen"] > first["logps/chosen"]
    elif name == "discopop":
        # eq. 5 is not monotone at z = 0: dL/dz = 5 - 5 ln 2 - 0.75 > 0 with tau 0.05, so the first steps
        # descend towards its local minimum at a negative margin (as TRL's loss of the same formula does)
        assert last["rewards/margins"] < first["rewards/margins"] == 0
    else:
        assert last["rewards/margins"] > first["rewards/margins"], (first, last)


def scored_demo(path, n: int = 16):
    """builtin:demo's first n pairs with reward scores: the chosen scored 1 + i/n, the rejected 0."""
    from dpokit.data import load_examples

    examples, _ = load_examples("builtin:demo")
    rows = [
        {
            "prompt": e.prompt,
            "chosen": e.chosen,
            "rejected": e.rejected,
            "score_chosen": 1 + i / n,
            "score_rejected": 0.0,
        }
        for i, e in enumerate(examples[:n])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [1 + i / n for i in range(n)]


@pytest.mark.slow
def test_rebel_starts_at_the_squared_score_gaps_and_learns(tmp_path, tiny_model_dir):
    """REBEL through the CLI on 16 scored pairs, each step the whole set: step 1's loss is the mean squared
    score gap (the policy is the reference: beta h = 0), then the loss falls and the margin grows."""
    gaps = scored_demo(tmp_path / "scored.jsonl")
    records = cli_run(
        tmp_path,
        tiny_model_dir,
        tmp_path / "scored.jsonl",
        "loss.type=rebel",
        "data.eval_fraction=0",
        "train.batch_size=16",
        "train.max_steps=3",
        "train.lr=2e-3",
    )
    first, last = records[0], records[-1]
    assert first["loss"] == pytest.approx(sum(g * g for g in gaps) / len(gaps), abs=1e-6)
    assert first["rewards/margins"] == 0
    assert last["loss"] < first["loss"] and last["rewards/margins"] > 0


def test_rebel_refuses_pairs_without_scores(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "half.jsonl"
    scored_demo(data, 4)
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "score_rejected"})
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "r"
    assert main(cli_args(tiny_model_dir, run, f"data.train={data}", "loss.type=rebel")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"dpokit train: error: {data}:line 3: score_rejected: missing: loss.type rebel regresses on each pair's "
        "score gap (score_chosen - score_rejected); rated lists and dpokit iterate's pairs carry both"
    ]
    assert not run.exists()


@pytest.mark.slow
def test_two_combined_losses_rpo(tmp_path, tiny_model_dir):
    records = cli_run(
        tmp_path, tiny_model_dir, "builtin:demo", "loss.type=[sigmoid,sft]", "loss.weights=[1.0,0.5]"
    )
    first = records[1]
    # step 1: sigmoid = ln 2 and sft = mean per-token NLL of the chosen completions, so loss > ln 2
    assert first["loss"] > math.log(2) and first["rewards/margins"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_unpaired_losses_on_the_llama_factory_kto_file(tmp_path, tiny_model_dir, shared_data, name):
    data = shared_data / "llama-factory" / "kto_en_demo.json"
    records = cli_run(
        tmp_path, tiny_model_dir, data, f"loss.type={name}", "data.limit=40", "train.batch_size=8"
    )
    first, last = records[1], records[-1]
    # at step 1 rho = 0 (and z0 = 0), so every example's loss is 1 - sigma(0) = sigma(0) = 0.5
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert "rewards/chosen" in first and "rewards/rejected" in first and "eval/loss" in last
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["train_file"]["formats"] == {"unpaired": 300}


@pytest.mark.slow
def test_readme_kto_example_runs_with_single_label_batches(tmp_path, shared_data, capsys):
    """The README's command, with batches of 2 so that many micro-batches hold one label only: a step that
    cannot define a margin leaves it out (and the console shows `-`), never a crash or a nan."""
    args = [
        "train",
        "configs/tiny.yaml",
        "loss.type=kto",
        f"data.train={KTO_DEMO}",
        "train.max_steps=3",
        "train.batch_size=2",
        f"train.run_dir={tmp_path / 'r'}",
    ]
    assert main(args) == 0
    assert "nan" not in capsys.readouterr().err.lower()
    steps = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["step"] > 0]
    assert any("rewards/margins" not in r for r in steps) and all(
        "rewards/accuracies" not in r for r in steps
    )


@pytest.mark.slow
def test_kto_refuses_paired_data_and_dpo_refuses_unpaired(tmp_path, tiny_model_dir, shared_data, capsys):
    base = [
        f"model.name={tiny_model_dir}",
        "train.progress=false",
        f"train.run_dir={tmp_path / 'r'}",
        "train.overwrite=true",
    ]
    assert main(["train", "data.train=builtin:demo", "loss.type=kto", *base]) == 2
    assert "needs prompt/completion/label records" in capsys.readouterr().err
    kto_file = shared_data / "llama-factory" / "kto_en_demo.json"
    assert main(["train", f"data.train={kto_file}", "loss.type=sigmoid", *base]) == 2
    assert "use loss.type=kto" in capsys.readouterr().err


def test_ld_token_weights_literal():
    # pair 0: chosen 3 tokens, rejected 1 -> shared length 1; pair 1: chosen 1, rejected 2 -> shared 1
    pairs = [TokenizedPair([1], [2, 3, 4], [5]), TokenizedPair([1], [6], [7, 8])]
    batch = Layout().pairs(pairs, pad_id=0)
    # token order: seq0 (2,3,4), seq1 (6), seq2 (5), seq3 (7,8)
    assert ld_token_weights(batch, 0.25).tolist() == [1.0, 0.25, 0.25, 1.0, 1.0, 1.0, 0.25]


@pytest.mark.slow
def test_ld_alpha_one_is_plain_dpo_and_below_one_changes_the_loss(tmp_path, tiny_model_dir):
    plain = cli_run(tmp_path / "a", tiny_model_dir, "builtin:demo", "data.eval_fraction=0")
    same = cli_run(
        tmp_path / "b", tiny_model_dir, "builtin:demo", "data.eval_fraction=0", "loss.ld_alpha=1.0"
    )
    assert [r["loss"] for r in plain] == [r["loss"] for r in same]
    ld = cli_run(tmp_path / "c", tiny_model_dir, "builtin:demo", "data.eval_fraction=0", "loss.ld_alpha=0.5")
    assert ld[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and ld[1]["loss"] != plain[1]["loss"]


def test_wpo_weights_hand_worked():
    # one pair, chosen 1 token with log p = log 0.5 and sum_v p_v^2 = 0.5 -> mean term log 0.5 - log 0.5 = 0;
    # rejected 2 tokens with terms -1 and -2 -> mean -1.5. w = min(1, exp(0 - 1.5)) = e^-1.5
    batch = Layout().pairs([TokenizedPair([1], [2], [3, 4])], pad_id=0)
    tok = torch.tensor([math.log(0.5), -1.0, -2.0])
    sq = torch.tensor([math.log(0.5), 0.0, 0.0])
    assert wpo_weights(tok, sq, batch).tolist() == pytest.approx([math.exp(-1.5)])


@pytest.mark.slow
def test_wpo_run(tmp_path, tiny_model_dir):
    records = cli_run(
        tmp_path, tiny_model_dir, "builtin:demo", "loss.use_weighting=true", "data.eval_fraction=0"
    )
    # weights < 1 scale the ln 2 of step 1 down
    assert 0 < records[0]["loss"] < math.log(2)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["loss.type=[kto,sigmoid]"], "cannot be combined"),
        (["loss.type=exo_pair"], "exo_pair needs loss.label_smoothing > 0"),
        (["loss.ld_alpha=1.5"], "loss.ld_alpha=1.5: must be in [0, 1]"),
        (["loss.ld_alpha=-0.1"], "must be in [0, 1]"),
        (["loss.type=[sigmoid,sft]", "loss.weights=[1.0]"], "one weight per loss"),
        (
            ["loss.type=ipo", "loss.f_divergence=js_divergence"],
            "applies only to exo_pair, hinge, robust, sigmoid",
        ),
        (["loss.type=kto", "train.batch_size=1"], "train.batch_size >= 2"),
        (["loss.f_divergence=chi2"], "loss.f_divergence='chi2'"),
    ],
)
def test_bad_combinations_are_refused_up_front(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=x.jsonl", *overrides])
    assert fragment in str(info.value)


def test_evaluation_does_not_move_the_bco_baseline():
    from dpokit.objective import Objective

    objective = Objective(load_config(None, ["data.train=x", "loss.type=bco_pair"]).loss)
    batch = Layout().pairs([TokenizedPair([1], [2, 3], [4])], pad_id=0)

    class ZeroReference:
        def sequence_logps(self, b, token_weights=None):
            return torch.zeros(b.num_seqs)

    def policy(*args, **kwargs):  # every completion token has log-prob -0.5
        return torch.full((args[3].numel(),), -0.5, requires_grad=torch.is_grad_enabled())

    objective(policy, ZeroReference(), batch)  # training: rewards 0.1 * [-1, -0.5] -> mean -0.075
    assert objective.bco.count == 1 and objective.bco.value == pytest.approx(-0.075)
    with torch.no_grad():  # evaluation reads the baseline without moving it
        objective(policy, ZeroReference(), batch)
    assert objective.bco.count == 1
