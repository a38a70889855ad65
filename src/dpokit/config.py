"""The one config schema: typed dataclasses whose field docstrings are also the `--help` text.

A config is built from a YAML file plus dotted overrides (`loss.beta=0.2`). Unknown keys, values of the
wrong type and invalid values are collected and raised once, as a `ConfigError` listing every problem.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Policy to train: a local HF folder, a hub id, a .gguf file, or an alias (smollm2-135m-instruct, tiny-random)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository to run. Off by default: it executes downloaded code."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa or eager."""
    adapter: str = ""
    """A saved LoRA adapter folder the policy starts from (a dpokit checkpoint or any PEFT adapter of
    model.name, e.g. an SFT adapter); needs lora.enabled=true, and its own rank and targets replace lora.*."""
    adapter_mode: str = "continue"
    """What training does with model.adapter: continue (train that adapter further) or merge (merge it into
    model.name and train a new LoRA adapter, lora.*, on top; the reference is then the merged model, with
    no second copy)."""
    reference: str = ""
    """pi_ref. Empty: the starting policy (model.name; with model.adapter, model.name plus that adapter).
    `base`: model.name with no adapter (LoRA). Else a model folder, .gguf file, alias or hub id: a separate
    checkpoint with the same tokenizer."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters (reference = same model, adapters off). False = full fine-tuning (reference = frozen copy)."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training (always off for the reference pass)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that receive adapters."""


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a JSON/JSONL(.gz)/Parquet/CSV file, a saved HF dataset folder, or `builtin:demo`. A
    relative path in a config file is read from that file's folder (on the command line: the current one)."""
    eval: str = ""
    """Separate held-out file. When empty, `eval_fraction` of the training prompts are held out."""
    eval_fraction: float = 0.0
    """Fraction of distinct prompts held out for evaluation when `eval` is empty (0 = no eval split)."""
    max_length: int = 512
    """Most tokens of prompt + one completion; completions are cut from the right to fit."""
    max_prompt_length: int = 256
    """Most prompt tokens; longer prompts are cut from the left (the end of a dialogue is kept)."""
    skip_invalid: bool = False
    """Skip and count invalid records instead of stopping at the first one."""
    limit: int = 0
    """Use only the first N valid pairs of the training file (0 = all)."""
    drop_identical: bool = True
    """Drop pairs whose chosen and rejected are identical (no signal); counted in data_stats.json."""
    deduplicate: str = "pairs"
    """Drop repeats (the first is kept): pairs (the same prompt, chosen and rejected), prompt_chosen (also
    the same prompt and chosen with another rejected), or off."""
    max_similarity: float = 1.0
    """Drop pairs whose chosen/rejected token similarity (Dice, see `dpokit data check`) exceeds this (1 = off)."""
    min_agreement: float | None = None
    """Drop pairs whose annotator agreement (share voting with the majority) is below this."""
    min_score_gap: float | None = None
    """Drop pairs whose score_chosen - score_rejected is below this."""
    min_confidence: float | None = None
    """Drop pairs whose `confidence` field is below this."""
    rebalance_length: bool = False
    """Subsample so that chosen is longer in as many pairs as it is shorter (counters length bias)."""
    chat_template: str = ""
    """Chat template for conversational data in place of the model's own: a Jinja file, or chatml-tools
    (dpokit's ChatML with tools, tool calls and tool results). Needed when the model's template cannot render
    tools or tool calls (SmolLM2's cannot: training says so). Saved with the checkpoints' tokenizer."""
    targets: str = "assistant"
    """Which tokens of a completion of several messages are trained: assistant (its assistant turns; tool
    results and user turns in it are context, read but not scored), last (its final assistant turn) or all
    (every token after the prompt). A completion of one message is trained whole."""
    list_pairs: str = "best_vs_rest"
    """How a rated list (a prompt with several scored completions, e.g. UltraFeedback's raw form) becomes
    pairs: best_vs_rest (the best against each one scored lower) or best_worst (one pair)."""
    tokenized_cache: bool = True
    """Keep the tokenized pairs in DPOKIT_CACHE/tokenized, keyed by the pairs, the tokenizer, the lengths and
    dpokit's tokenization code: a second run on the same data skips tokenization."""


@dataclass
class LossConfig:
    type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """Loss name, or a list combined as a weighted sum (e.g. [sigmoid, sft] = RPO). See docs/losses.md."""
    weights: list[float] = field(default_factory=list)
    """Weight of each loss in `type` (empty = 1.0 each)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward r = beta * log(pi / pi_ref) (IPO's tau, SimPO's beta)."""
    label_smoothing: float = 0.0
    """Assumed label-flip rate eps: conservative DPO (sigmoid), robust, exo_pair (needs > 0), aot, simpo, cpo."""
    ld_alpha: float = 1.0
    """LD-DPO: weight of the log-probs of tokens past the shorter completion's length (1 = off, in [0, 1])."""
    f_divergence: str = "reverse_kl"
    """f-DPO regulariser for sigmoid/robust/hinge/exo_pair: reverse_kl, forward_kl, js_divergence, alpha_divergence."""
    f_alpha: float = 1.0
    """The alpha of alpha_divergence (> 0)."""
    use_weighting: bool = False
    """WPO: weight each pair by its policy-probability under the current model (arXiv:2406.11827)."""
    discopop_tau: float = 0.05
    """Temperature of the DiscoPOP modulation."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    orpo_lambda: float = 0.1
    """ORPO weight lambda of the odds-ratio term."""
    cpo_alpha: float = 1.0
    """CPO weight of the behaviour-cloning (NLL) term."""
    desirable_weight: float = 1.0
    """KTO weight of desirable examples."""
    undesirable_weight: float = 1.0
    """KTO weight of undesirable examples."""
    center_rewards_coefficient: float = 0.0
    """Reward models (bradley_terry, `dpokit train-rm`): weight of the (r_chosen + r_rejected)^2 term that keeps
    scores centred at 0 (TRL's center_rewards_coefficient; e.g. 0.01). 0 = off."""


@dataclass
class TrainConfig:
    run_dir: str = ""
    """Output folder: the run directory (config, metrics, checkpoints; see README). Empty = runs/<timestamp>."""
    overwrite: bool = False
    """Allow writing into a run_dir that already holds a run."""
    resume: bool = False
    """Continue the run in run_dir from its latest resumable checkpoint (same config), to the same result."""
    seed: int = 0
    """Seed for weights of new layers, data order and dropout."""
    batch_size: int = 4
    """Pairs per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = run `epochs` epochs."""
    epochs: float = 1.0
    """Passes over the training pairs when max_steps is 0."""
    lr: float = 5e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    scheduler: str = "linear"
    """Decay after warm-up: linear (to 0), cosine (to 0) or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still logged)."""
    bf16: bool = False
    """bf16 autocast for the forward passes (fp32 master weights)."""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda."""
    logps_chunk_size: int = 256
    """Completion tokens per chunk of the LM head + log-softmax (bounds the [tokens, vocab] buffer)."""
    prefix_sharing: bool = True
    """Prompt + chosen + rejected in one sequence: the prompt is computed once per pair (exact; false = one
    padded row per sequence, the plain layout)."""
    group_by_prompt: bool = False
    """Shuffle prompts rather than pairs, so the pairs of one prompt (several preference points of one
    conversation, K samples paired several ways) share micro-batches, where prefix sharing computes the
    prompt and each distinct completion once. `dpokit iterate` turns it on; the same order as false when
    every prompt is unique."""
    packing: bool = True
    """Pack several documents per row (`pack_tokens`), each attending only within itself: no padding compute
    (exact; false = one document per row)."""
    pack_tokens: int = 0
    """Target tokens of a packed row: a micro-batch's documents spread over ceil(total / pack_tokens) rows
    of nearly equal length. 0 = twice data.max_length (measured in docs/performance.md: with block attention
    the row length barely matters; with dense masks longer rows cost their length squared)."""
    attention: str = "blocks"
    """How prefix-shared and packed rows attend: blocks (each document on its own: attention costs what the
    documents cost) or dense (one masked attention over the whole row: the reference implementation, and the
    fallback for models that attend otherwise, e.g. eager or sliding-window attention)."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training and cache them on disk (no reference passes in
    training; full fine-tuning then holds no frozen copy)."""
    ref_cache_dir: str = ""
    """Folder of the reference log-prob cache (empty = $DPOKIT_CACHE/ref-logps)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass: less memory, ~30% more compute."""
    low_memory_allocator: bool = False
    """Return freed memory to the OS at once (glibc: mmap threshold 64 KiB): lower peak RSS, slower steps."""
    fast_fp32_matmul: bool = False
    """Route fp32 matmuls through oneDNN on CPU (faster on some CPUs: docs/performance.md), after an accuracy
    check against float64 on this CPU."""
    checkpoint_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    save_final: bool = True
    """Save a checkpoint at the end of training."""
    drift_warn: float = 1.0
    """Warn when the mean |log pi/pi_ref| per completion token exceeds this many nats (reference drift)."""
    flat_window: int = 25
    """Warn when rewards/margins has not grown over this many steps (0 = off)."""
    flat_min_delta: float = 0.0
    """Growth of the windowed mean margin below which margins count as flat."""
    progress: bool = True
    """Show a progress bar with the live loss and margin."""
    report_to: list[str] = field(default_factory=list)
    """Live metric sinks through Accelerate trackers, e.g. [tensorboard], [wandb], [mlflow], [trackio] or
    [all] (each needs its package installed); the run's own metrics file is always written."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the eval split every N optimizer steps (0 = only at the end)."""
    at_start: bool = True
    """Evaluate once before the first step (the reference point for the margins)."""
    batch_size: int = 8
    """Pairs per eval batch."""
    sample_pairs: int = 8
    """Held-out pairs whose log-ratios, margin and loss are kept at every evaluation (pair_samples.jsonl,
    drawn in `dpokit report`); 0 = none."""
    patience: int = 0
    """Early stopping: stop after this many evaluations without improvement of eval/rewards/margins (0 = off)."""
    min_delta: float = 0.0
    """Early stopping: the least gain in eval/rewards/margins that counts as an improvement."""


@dataclass
class IterateConfig:
    """`dpokit iterate`: rounds of sample -> score -> pair -> train -> evaluate (docs/iterate.md)."""

    rounds: int = 3
    """Rounds of on-policy DPO; each samples from the policy the previous round trained."""
    prompts: str = ""
    """Prompt file (any records with a `prompt` field; preference files too) or builtin:reviews."""
    prompts_split: str = ""
    """Keep only prompt records whose `split` field equals this (builtin:reviews: train / eval)."""
    prompts_per_round: int = 0
    """Prompts sampled each round (0 = all)."""
    fresh_prompts: bool = True
    """Each round takes the next prompts_per_round prompts (wrapping around); false = the same ones."""
    samples_per_prompt: int = 8
    """K completions sampled per prompt (they share one prompt prefill)."""
    max_new_tokens: int = 48
    """Longest sampled completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (1.0 = the policy's own distribution)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    sample_batch_size: int = 64
    """Sequences sampled together (prompts x samples)."""
    reward: str = "vader"
    """Scores each completion: vader, length, keywords:..., regex:..., model:PATH or module:function
    (rewards.py). With a judge, it scores the held-out evaluation only."""
    judge: str = ""
    """Pairwise judge `module:function(prompt, a, b) -> P(a better than b)` in [0, 1]; a sample's score is
    its mean win probability against the prompt's other samples. `human`: people choose on the labeling page
    (`dpokit label`), which the round serves while it waits for their votes."""
    label_overlap: int = 1
    """iterate.judge=human: annotators who label each comparison."""
    label_host: str = "127.0.0.1"
    """iterate.judge=human: the labeling page's address (others than loopback need $DPOKIT_LABEL_TOKEN)."""
    label_port: int = 8765
    """iterate.judge=human: the labeling page's port (0 = any free one; the log says which)."""
    pairing: str = "best_worst"
    """best_worst: one pair per prompt, the best against the worst sample; all_pairs: every pair of samples
    whose scores differ by more than min_score_gap."""
    min_score_gap: float = 0.0
    """Pairs whose scores differ by this much or less are ties: dropped and counted."""
    eos_penalty: float = 0.0
    """Subtracted from the score of a completion that ends without EOS (cut at max_new_tokens)."""
    length_penalty: float = 0.0
    """Subtracted from a completion's score per token: a reward model that prefers longer answers buys
    reward with length, and this prices it (0 = off)."""
    reference: str = "initial"
    """pi_ref of every round: initial (the starting model) or previous (the policy the round starts from)."""
    lr_decay: float = 1.0
    """Round r trains at train.lr * lr_decay^(r-1) (below 1: smaller steps as the rounds go)."""
    kl_budget: float = 0.0
    """Most held-out KL(policy || initial model), in nats per completion, a round may end at (0 = no limit):
    a round above it is pulled back toward the previous round's weights (a bisection over the line between
    them, measured on the held-out prompts) until it fits, and says so. Needs iterate.eval_prompts."""
    eval_prompts: str = ""
    """Held-out prompts for each round's evaluation (empty = no evaluation)."""
    eval_split: str = ""
    """Keep only held-out prompt records whose `split` field equals this."""
    eval_num_prompts: int = 64
    """Held-out prompts used (0 = all)."""
    eval_samples: int = 2
    """Completions per held-out prompt from each model."""
    seed: int = 0
    """Seed of every sampling draw (combined with the round number)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its docstring), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, field type, default, doc) for every leaf field of the schema."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key + ".")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield key, tp, default, docs.get(f.name, "")


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """` (did you mean x?)` for the choices closest to a misspelt `word`, else ``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    close += [c for c in choices if c.startswith(word[:3]) and c not in close and len(word) >= 3][
        : 3 - len(close)
    ]
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [value]  # `loss.type=sigmoid` is a one-element list
        if not isinstance(value, list):
            problems.append(f"{key}={value!r}: expected a list of {item_tp.__name__}")
            return value
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; a numeric literal is still a number.
        try:
            return tp(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        problems.append(f"{key}={value!r}: expected true or false")
    elif tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        problems.append(f"{key}={value!r}: expected an integer")
    elif tp is float and not isinstance(value, float):
        problems.append(f"{key}={value!r}: expected a number")
    elif tp is str and not isinstance(value, str):
        problems.append(f"{key}={value!r}: expected a string")
    return value


TRL_NAMES = {
    "model_name_or_path": "model.name",
    "ref_model": "model.reference",
    "output_dir": "train.run_dir",
    "overwrite_output_dir": "train.overwrite",
    "resume_from_checkpoint": "train.resume (or dpokit train --resume RUN_DIR)",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.scheduler",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "adam_beta1": "train.adam_betas",
    "adam_beta2": "train.adam_betas",
    "seed": "train.seed",
    "bf16": "train.bf16",
    "save_steps": "train.checkpoint_every",
    "eval_steps": "eval.every",
    "report_to": "train.report_to",
    "precompute_ref_log_probs": "train.precompute_ref",
    "padding_free": "train.packing",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "max_completion_length": "data.max_length (prompt + completion)",
    "dataset_name": "data.train",
    "train_dataset": "data.train",
    "eval_dataset": "data.eval",
    "beta": "loss.beta",
    "loss_type": "loss.type",
    "loss_weights": "loss.weights",
    "label_smoothing": "loss.label_smoothing",
    "rpo_alpha": "loss.type=[sigmoid,sft] with loss.weights=[1.0,ALPHA]",
    "f_divergence_type": "loss.f_divergence",
    "f_alpha_divergence_coef": "loss.f_alpha",
    "use_weighting": "loss.use_weighting",
    "ld_alpha": "loss.ld_alpha",
    "simpo_gamma": "loss.simpo_gamma",
    "cpo_alpha": "loss.cpo_alpha",
    "discopop_tau": "loss.discopop_tau",
    "desirable_weight": "loss.desirable_weight",
    "undesirable_weight": "loss.undesirable_weight",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "use_peft": "lora.enabled",
}
"""TRL's DPOConfig / model-config names a user is likely to type, and dpokit's key for each."""


def _unknown(key: str, names, prefix: str) -> str:
    leaf = str(key).rsplit(".", 1)[-1]
    where = f"{prefix}{key}: unknown key"
    if leaf in TRL_NAMES and TRL_NAMES[leaf] != f"{prefix}{leaf}":
        return f"{where} (TRL's {leaf}; here it is {TRL_NAMES[leaf]})"
    return f"{where}{did_you_mean(str(key), names, prefix)}; valid keys: {', '.join(sorted(names))}"


def _build(cls: type, data: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(_unknown(key, names, prefix))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, key = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
                continue
            kwargs[f.name] = _build(tp, value, key + ".", problems)
        else:
            before = len(problems)
            coerced = _coerce(value, tp, key, problems)
            if len(problems) == before:  # a mistyped value keeps the default, so validation can still run
                kwargs[f.name] = coerced
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`a.b=1` strings -> nested dict; values are parsed as YAML scalars/lists (`true`, `0.1`, `[q,v]`)."""
    nested: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected KEY=VALUE, e.g. loss.beta=0.2")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
        else:
            node[parts[-1]] = value
    return nested, problems


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """A config file's sections as a dict; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (model, data, ...)"])
    return from_config_folder(data, path.parent)


FILE_KEYS = (("data", "train"), ("data", "eval"), ("iterate", "prompts"), ("iterate", "eval_prompts"))
"""The config's data files, read from the config file's folder when they are relative paths."""


def from_config_folder(data: dict, folder: Path) -> dict:
    """A config file's relative data paths (FILE_KEYS) as paths from its folder when a file or folder is
    there: the config works from any current folder. Anything else (an existing path from the current
    folder, `builtin:NAME`, a hub dataset id) stays as written."""
    for section, key in FILE_KEYS:
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if (
            isinstance(value, str)
            and value
            and not value.startswith("builtin:")
            and not Path(value).is_absolute()
        ):
            there = folder / Path(value).expanduser()
            if there.exists():
                data[section][key] = str(there.resolve())
    return data


def nested(values: dict, problems: list[str]) -> dict:
    """Settings from Python: dotted keys (`{"train.lr": 1e-5}`) and sections (`{"train": {"lr": 1e-5}}`,
    `model="NAME"` for model.name) as one nested dict."""
    out: dict = {}
    for key, value in values.items():
        parts = str(key).split(".")
        if len(parts) == 1 and key == "model" and isinstance(value, str):
            value = {"name": value}
        if len(parts) == 1 and not isinstance(value, dict):
            sections = [f.name for f in dataclasses.fields(Config)]
            problems.append(
                _unknown(key, sections, "")
                if key in TRL_NAMES
                else f"{key}={value!r}: expected a section ({', '.join(sections)}) as a dict, or a dotted key "
                f"such as train.lr{did_you_mean(str(key), sections)}"
            )
            continue
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = merge(node.get(parts[-1], {}), value) if isinstance(value, dict) else value
    return out


def config_source(source) -> dict:
    """A config given as None, a YAML path, a dict (sections or dotted keys) or a Config, as a nested dict."""
    if source is None:
        return {}
    if isinstance(source, Config):
        return to_dict(source)
    if isinstance(source, dict):
        problems: list[str] = []
        data = nested(source, problems)
        if problems:
            raise ConfigError(problems)
        return data
    if isinstance(source, (str, Path)):
        return read_yaml(source)
    raise ConfigError(
        [f"config: expected a YAML path, a dict or a dpokit Config, got {type(source).__name__}"]
    )


def build_config(data: dict, command: str = "train", problems: list[str] | None = None) -> Config:
    """The Config of nested `data`, type-checked and validated for `command`; one ConfigError listing every
    problem (with those already found in `problems`)."""
    problems = list(problems or [])
    cfg = _build(Config, data, "", problems)
    from dpokit.validation import validate

    problems += validate(cfg, command)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, command: str = "train"
) -> Config:
    """Read a YAML file, apply dotted overrides, type-check and validate for `command` (train, or iterate,
    which builds data.train itself); raise one ConfigError."""
    data = read_yaml(path) if path is not None else {}
    extra, problems = parse_overrides(overrides or [])
    return build_config(merge(data, extra), command, problems)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(command: str = "train") -> str:
    """Every config key of `command` with its type, default and docstring (the `--help` epilog): the
    iterate section is listed for `iterate` only."""
    lines = []
    for key, tp, default, doc in iter_fields():
        if key.startswith("iterate.") and command != "iterate":
            continue
        name = getattr(tp, "__name__", str(tp))
        lines.append(f"  {key} ({name}, default {default!r})\n      {doc}")
    return "\n".join(lines)
