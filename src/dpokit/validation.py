"""Semantic checks of a type-correct config: every problem found, each saying what to change.

Loss names and their properties come from the loss registry (`losses.LOSSES`); nothing here repeats them.
"""

from __future__ import annotations

from pathlib import Path

from dpokit.config import Config, LossConfig, did_you_mean

SCHEDULERS = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "eager")
DEDUPLICATE = ("pairs", "prompt_chosen", "off")
TARGETS = ("assistant", "last", "all")
"""data.targets (tokenize.TARGETS)."""
LIST_PAIRS = ("best_vs_rest", "best_worst")
"""data.list_pairs (data/lists.py)."""
CHAT_TEMPLATES = {"chatml-tools": "chatml_tools.jinja"}
"""Shipped chat templates (dpokit/assets/) by name."""
ATTENTION_LAYOUTS = ("blocks", "dense")
TRACKERS = {
    # name -> (accelerate's availability check, what to install)
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "trackio": ("is_trackio_available", "trackio"),
    "comet_ml": ("is_comet_ml_available", "comet_ml"),
    "aim": ("is_aim_available", "aim"),
    "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab"),
}


LOSS_ALIASES = {
    "dpo": " (DPO is loss.type=sigmoid, TRL's name for it)",
    "rpo": " (RPO is loss.type=[sigmoid,sft] with loss.weights=[1.0,ALPHA])",
    "cdpo": " (cDPO is loss.type=sigmoid with loss.label_smoothing > 0)",
    "ld_dpo": " (LD-DPO is loss.type=sigmoid with loss.ld_alpha < 1)",
    "wpo": " (WPO is loss.use_weighting=true)",
}
"""Names users type for losses dpokit spells otherwise."""
PAIRINGS = ("best_worst", "all_pairs")
ITERATE_REFERENCES = ("initial", "previous")


def validate(cfg: Config, command: str = "train") -> list[str]:
    """Every problem found in `cfg` for `command` (train, iterate, or rm: a reward model) (empty = valid)."""
    return [
        *(_iterate_problems(cfg) if command == "iterate" else _data_problems(cfg)),
        *_reward_model_problems(cfg, command == "rm"),
        *_data_shape_problems(cfg),
        *_model_problems(cfg),
        *validate_loss(cfg.loss, cfg.train.batch_size),
        *_train_problems(cfg),
        *_eval_problems(cfg),
        *_lora_problems(cfg),
        *_environment_problems(cfg),
    ]


def _data_problems(cfg: Config) -> list[str]:
    if not cfg.data.train:
        return ["data.train is empty: give a preference file, e.g. data.train=pairs.jsonl"]
    return []


def _reward_model_problems(cfg: Config, rm: bool) -> list[str]:
    """`dpokit train-rm` trains with bradley_terry alone, from model.name, with no reference; the policy
    commands take no reward-model loss."""
    from dpokit.losses import LOSSES

    reward_losses = [n for n in cfg.loss.type if n in LOSSES and LOSSES[n].reward_model]
    if not rm:
        return (
            [
                f"loss.type={cfg.loss.type}: {', '.join(reward_losses)} trains a reward model: use dpokit train-rm"
            ]
            if reward_losses
            else []
        )
    p = []
    if cfg.loss.type != ["bradley_terry"]:
        p.append(
            f"loss.type={cfg.loss.type}: dpokit train-rm trains with bradley_terry (leave loss.type unset)"
        )
    if cfg.model.adapter or cfg.model.reference:
        p.append(
            "model.adapter / model.reference: a reward model starts from model.name and has no reference"
        )
    if cfg.train.precompute_ref:
        p.append("train.precompute_ref=true: a reward model has no reference to precompute")
    if cfg.loss.center_rewards_coefficient < 0:
        p.append(f"loss.center_rewards_coefficient={cfg.loss.center_rewards_coefficient}: must be >= 0")
    return p


def _iterate_problems(cfg: Config) -> list[str]:
    it, p = cfg.iterate, []
    if cfg.data.train:
        p.append(
            f"data.train={cfg.data.train!r}: `dpokit iterate` samples each round's pairs itself; leave "
            "data.train empty (the prompts come from iterate.prompts)"
        )
    if not it.prompts:
        p.append("iterate.prompts is empty: give a prompt file, e.g. iterate.prompts=builtin:reviews")
    checks = [
        (it.rounds >= 1, f"iterate.rounds={it.rounds}: must be >= 1"),
        (it.prompts_per_round >= 0, f"iterate.prompts_per_round={it.prompts_per_round}: must be >= 0"),
        (it.samples_per_prompt >= 2, f"iterate.samples_per_prompt={it.samples_per_prompt}: must be >= 2"),
        (it.max_new_tokens >= 1, f"iterate.max_new_tokens={it.max_new_tokens}: must be >= 1"),
        (it.temperature > 0, f"iterate.temperature={it.temperature}: must be > 0 (greedy samples are alike)"),
        (0 < it.top_p <= 1, f"iterate.top_p={it.top_p}: must be in (0, 1]"),
        (it.sample_batch_size >= 1, f"iterate.sample_batch_size={it.sample_batch_size}: must be >= 1"),
        (it.min_score_gap >= 0, f"iterate.min_score_gap={it.min_score_gap}: must be >= 0"),
        (it.eos_penalty >= 0, f"iterate.eos_penalty={it.eos_penalty}: must be >= 0"),
        (it.length_penalty >= 0, f"iterate.length_penalty={it.length_penalty}: must be >= 0"),
        (it.eval_num_prompts >= 0, f"iterate.eval_num_prompts={it.eval_num_prompts}: must be >= 0"),
        (it.eval_samples >= 1, f"iterate.eval_samples={it.eval_samples}: must be >= 1"),
        (it.lr_decay > 0, f"iterate.lr_decay={it.lr_decay}: must be > 0"),
        (it.kl_budget >= 0, f"iterate.kl_budget={it.kl_budget}: must be >= 0 (0 = no limit)"),
        (
            not it.kl_budget or bool(it.eval_prompts),
            "iterate.kl_budget is measured on held-out prompts: give iterate.eval_prompts too",
        ),
        (bool(it.reward or it.judge), "iterate.reward and iterate.judge are both empty: give one"),
    ]
    p += [msg for ok, msg in checks if not ok]
    if it.pairing not in PAIRINGS:
        p.append(f"iterate.pairing={it.pairing!r}: choose one of {list(PAIRINGS)}")
    if it.reference not in ITERATE_REFERENCES:
        p.append(f"iterate.reference={it.reference!r}: choose one of {list(ITERATE_REFERENCES)}")
    if it.judge and it.eval_prompts and not it.reward:
        p.append(
            "iterate.eval_prompts with a judge and no iterate.reward: the held-out evaluation scores each "
            "completion; give iterate.reward too, or leave iterate.eval_prompts empty"
        )
    if it.judge and ":" not in it.judge and it.judge != "human":
        p.append(f"iterate.judge={it.judge!r}: expected module:function, or human (the labeling page)")
    if it.label_overlap < 1:
        p.append(f"iterate.label_overlap={it.label_overlap}: annotators per comparison, at least 1")
    if cfg.model.adapter or cfg.model.reference:
        p.append(
            "model.adapter / model.reference are set per round by `dpokit iterate` (iterate.reference chooses "
            "the reference); leave them empty"
        )
    from dpokit.losses import LOSSES

    unpaired = [n for n in cfg.loss.type if n in LOSSES and LOSSES[n].unpaired]
    if unpaired:
        p.append(f"loss.type={cfg.loss.type}: iterate trains on pairs; {unpaired} needs unpaired data")
    return p


def _model_problems(cfg: Config) -> list[str]:
    m, p = cfg.model, []
    if m.adapter and not cfg.lora.enabled:
        p.append(
            f"model.adapter={m.adapter!r} needs lora.enabled=true (the adapter is trained further); to fine-tune "
            "a merged model fully, give it as model.name"
        )
    if m.adapter_mode not in ("continue", "merge"):
        p.append(f"model.adapter_mode={m.adapter_mode!r}: choose continue or merge")
    if m.reference == "base" and not cfg.lora.enabled:
        p.append(
            "model.reference=base means model.name without LoRA adapters; with full fine-tuning the starting "
            "policy is model.name already: leave model.reference empty"
        )
    return p


def _data_shape_problems(cfg: Config) -> list[str]:
    d, p = cfg.data, []
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction={d.eval_fraction}: must be in [0, 1)")
    if d.eval and d.eval_fraction > 0:
        p.append("data.eval and data.eval_fraction are both set: use one of them")
    if d.max_length <= 1:
        p.append(f"data.max_length={d.max_length}: must be > 1")
    if d.max_prompt_length <= 0:
        p.append(f"data.max_prompt_length={d.max_prompt_length}: must be > 0")
    elif d.max_prompt_length >= d.max_length:
        p.append(
            f"data.max_prompt_length={d.max_prompt_length} >= data.max_length={d.max_length}: "
            "no room is left for the completion; lower max_prompt_length or raise max_length"
        )
    if d.limit < 0:
        p.append(f"data.limit={d.limit}: must be >= 0")
    if not 0.0 <= d.max_similarity <= 1.0:
        p.append(f"data.max_similarity={d.max_similarity}: must be in [0, 1] (1 = off)")
    if d.deduplicate not in DEDUPLICATE:
        p.append(f"data.deduplicate={d.deduplicate!r}: choose one of {list(DEDUPLICATE)}")
    if d.targets not in TARGETS:
        p.append(f"data.targets={d.targets!r}: choose one of {list(TARGETS)}")
    if d.list_pairs not in LIST_PAIRS:
        p.append(f"data.list_pairs={d.list_pairs!r}: choose one of {list(LIST_PAIRS)}")
    if d.chat_template and d.chat_template not in CHAT_TEMPLATES and not Path(d.chat_template).is_file():
        p.append(
            f"data.chat_template={d.chat_template!r}: no such file; give a Jinja file or one of "
            f"{sorted(CHAT_TEMPLATES)}"
        )
    return p


def _train_problems(cfg: Config) -> list[str]:
    t, p = cfg.train, []
    checks = [
        (t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1"),
        (t.grad_accum >= 1, f"train.grad_accum={t.grad_accum}: must be >= 1"),
        (t.max_steps >= 0, f"train.max_steps={t.max_steps}: must be >= 0"),
        (t.max_steps > 0 or t.epochs > 0, "train.max_steps=0 and train.epochs<=0: nothing to train"),
        (t.lr > 0, f"train.lr={t.lr}: must be > 0 (DPO with LoRA: ~5e-5; full: ~5e-7)"),
        (t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0"),
        (
            len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
            f"train.adam_betas={t.adam_betas}: two numbers in [0, 1)",
        ),
        (t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0"),
        (t.scheduler in SCHEDULERS, f"train.scheduler={t.scheduler!r}: choose one of {list(SCHEDULERS)}"),
        (t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm}: must be >= 0 (0 = no clipping)"),
        (t.device in DEVICES, f"train.device={t.device!r}: choose one of {list(DEVICES)}"),
        (t.logps_chunk_size >= 1, f"train.logps_chunk_size={t.logps_chunk_size}: must be >= 1"),
        (
            t.pack_tokens == 0 or t.pack_tokens >= 2,
            f"train.pack_tokens={t.pack_tokens}: must be >= 2 (0 = twice data.max_length)",
        ),
        (
            t.attention in ATTENTION_LAYOUTS,
            f"train.attention={t.attention!r}: choose one of {list(ATTENTION_LAYOUTS)}",
        ),
        (t.checkpoint_every >= 0, f"train.checkpoint_every={t.checkpoint_every}: must be >= 0"),
        (t.flat_window >= 0, f"train.flat_window={t.flat_window}: must be >= 0"),
        (t.drift_warn > 0, f"train.drift_warn={t.drift_warn}: must be > 0"),
    ]
    p += [msg for ok, msg in checks if not ok]
    if cfg.model.attn_implementation not in ATTENTION:
        p.append(
            f"model.attn_implementation={cfg.model.attn_implementation!r}: choose one of {list(ATTENTION)}"
        )
    if t.precompute_ref and _specs(cfg.loss) and any(s.unpaired for s in _specs(cfg.loss)):
        p.append(
            "train.precompute_ref=true with an unpaired loss: KTO's KL baseline pairs each prompt with another "
            "example's completion in the batch, so it cannot be cached; set train.precompute_ref=false"
        )
    return p


def _eval_problems(cfg: Config) -> list[str]:
    e, d, p = cfg.eval, cfg.data, []
    if e.every < 0:
        p.append(f"eval.every={e.every}: must be >= 0")
    if e.patience < 0:
        p.append(f"eval.patience={e.patience}: must be >= 0")
    if e.patience and not e.every:
        p.append("eval.patience needs periodic evaluation: set eval.every (e.g. eval.every=50)")
    if e.patience and not (d.eval or d.eval_fraction > 0):
        p.append("eval.patience needs held-out data: set data.eval or data.eval_fraction")
    if e.batch_size < 1:
        p.append(f"eval.batch_size={e.batch_size}: must be >= 1")
    if e.sample_pairs < 0:
        p.append(f"eval.sample_pairs={e.sample_pairs}: must be >= 0")
    return p


def _lora_problems(cfg: Config) -> list[str]:
    lo = cfg.lora
    if not lo.enabled:
        return []
    checks = [
        (lo.r >= 1, f"lora.r={lo.r}: must be >= 1"),
        (lo.alpha > 0, f"lora.alpha={lo.alpha}: must be > 0"),
        (0 <= lo.dropout < 1, f"lora.dropout={lo.dropout}: must be in [0, 1)"),
        (bool(lo.target_modules), "lora.target_modules is empty: name modules, e.g. [q_proj, v_proj]"),
    ]
    return [msg for ok, msg in checks if not ok]


def _environment_problems(cfg: Config) -> list[str]:
    """What this machine lacks for the config: tracker packages, a CUDA device, bf16 on the GPU."""
    t, p = cfg.train, []
    unknown = [x for x in t.report_to if x != "all" and x not in TRACKERS]
    if unknown:
        p.append(
            f"train.report_to={t.report_to}: unknown tracker(s) {unknown}; choose from {['all', *TRACKERS]}"
        )
    missing = [TRACKERS[x][1] for x in t.report_to if x in TRACKERS and not _tracker_available(x)]
    if missing:
        p.append(
            f"train.report_to={t.report_to}: {', '.join(missing)} is not installed. Fix: pip install "
            f"{' '.join(missing)}, or drop it from train.report_to (the run dir always gets the metrics)"
        )
    if t.device == "cuda" or (t.bf16 and t.device == "auto"):
        import torch

        cuda = torch.cuda.is_available()
        if t.device == "cuda" and not cuda:
            p.append("train.device=cuda but no CUDA device is visible; use device=auto or cpu")
        if t.bf16 and cuda and not torch.cuda.is_bf16_supported():
            p.append("train.bf16=true but this GPU has no bf16 support; set train.bf16=false")
    return p


def _tracker_available(name: str) -> bool:
    import accelerate.utils

    check = getattr(accelerate.utils, TRACKERS[name][0], None)
    return bool(check()) if check else True


def _specs(lo: LossConfig) -> list:
    from dpokit.losses import LOSSES

    return [LOSSES[n] for n in lo.type if n in LOSSES]


def validate_loss(lo: LossConfig, batch_size: int) -> list[str]:
    """Every problem with the loss section, each with what to change."""
    from dpokit.losses import F_DIVERGENCES, LOSSES

    p = []
    for name in lo.type:
        if name not in LOSSES:
            p.append(
                f"loss.type: unknown loss {name!r}{LOSS_ALIASES.get(name) or did_you_mean(name, LOSSES)}; choose from {sorted(LOSSES)}"
            )
    if not lo.type:
        p.append(f"loss.type is empty; choose from {sorted(LOSSES)}")
    if len(set(lo.type)) != len(lo.type):
        p.append(f"loss.type={lo.type}: a loss is listed twice; give it one weight instead")
    if lo.weights and len(lo.weights) != len(lo.type):
        p.append(f"loss.weights={lo.weights}: needs one weight per loss in loss.type={lo.type}")
    if any(w < 0 for w in lo.weights):
        p.append(f"loss.weights={lo.weights}: weights must be >= 0")
    named = {n: LOSSES[n] for n in lo.type if n in LOSSES}
    unpaired = sorted(n for n, s in named.items() if s.unpaired)
    if unpaired and len(unpaired) < len(named):
        p.append(
            f"loss.type={lo.type}: unpaired losses ({', '.join(unpaired)}) cannot be combined with paired "
            "ones; they read different data"
        )
    if lo.beta <= 0:
        p.append(f"loss.beta={lo.beta}: must be > 0 (typical 0.01 to 0.5; SimPO 2 to 10)")
    if not 0.0 <= lo.label_smoothing < 0.5:
        p.append(f"loss.label_smoothing={lo.label_smoothing}: must be in [0, 0.5)")
    for n in (n for n, s in named.items() if s.needs_label_smoothing and lo.label_smoothing <= 0):
        p.append(
            f"loss.type={n} needs loss.label_smoothing > 0 (e.g. 1e-3): its label distribution must not be 0/1"
        )
    if not 0.0 <= lo.ld_alpha <= 1.0:
        p.append(f"loss.ld_alpha={lo.ld_alpha}: must be in [0, 1] (1 = off; LD-DPO uses 0.3 to 0.7)")
    if lo.f_divergence not in F_DIVERGENCES:
        p.append(f"loss.f_divergence={lo.f_divergence!r}: choose one of {list(F_DIVERGENCES)}")
    elif lo.f_divergence != "reverse_kl":
        plain = [n for n, s in named.items() if not s.f_divergence]
        if plain:
            with_f = sorted(n for n, s in LOSSES.items() if s.f_divergence)
            p.append(
                f"loss.f_divergence={lo.f_divergence} applies only to {', '.join(with_f)}; not to {plain}. "
                "Fix: set loss.f_divergence=reverse_kl or change loss.type"
            )
    if lo.f_alpha <= 0:
        p.append(f"loss.f_alpha={lo.f_alpha}: must be > 0")
    if lo.discopop_tau <= 0:
        p.append(f"loss.discopop_tau={lo.discopop_tau}: must be > 0")
    if lo.orpo_lambda < 0 or lo.cpo_alpha < 0:
        p.append("loss.orpo_lambda and loss.cpo_alpha must be >= 0")
    if lo.desirable_weight <= 0 or lo.undesirable_weight <= 0:
        p.append("loss.desirable_weight and loss.undesirable_weight must be > 0")
    if unpaired and (lo.use_weighting or lo.ld_alpha != 1.0):
        p.append(
            f"loss.use_weighting and loss.ld_alpha apply to paired losses only; unset them for {unpaired[0]}"
        )
    for n, s in named.items():
        if batch_size < s.min_batch_size:
            p.append(
                f"loss.type={n} with train.batch_size={batch_size}: its KL baseline pairs each prompt with "
                f"another example's completion in the batch; use train.batch_size >= {s.min_batch_size}"
            )
    return p
