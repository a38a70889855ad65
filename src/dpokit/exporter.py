"""`dpokit export`: a trained policy to what serves it. Loads it through trained.py; imports nothing from
training.

- A merged Hugging Face folder: LoRA merged into the base (PEFT's merge), or the fully fine-tuned weights,
  saved as plain safetensors with config, generation config and tokenizer (chat template included): it
  loads with transformers alone.
- Optionally a GGUF file for llama.cpp / Ollama (Llama-architecture models), written with the `gguf`
  package: llama.cpp's tensor names and q/k row order, the model's hyper-parameters, the tokenizer (BPE
  tokens, types, merges, special ids) and the chat template; tensors in f32, f16, bf16, q8_0 or q4_1. And
  an Ollama Modelfile beside it (FROM, TEMPLATE, stop tokens) for ChatML chat templates.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpokit.errors import UsageError
from dpokit.files import build_folder, write_file
from dpokit.modelcard import model_card, version
from dpokit.rundir import Run
from dpokit.trained import load_trained

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--dtype choices: the weights of the merged folder."""
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1")
"""--gguf-type choices (see _types)."""


@dataclass
class Exported:
    folder: Path
    gguf: Path | None
    modelfile: Path | None
    seconds: float
    source: str = ""
    """What was exported: the run and its checkpoint, or the folder."""


def merged_model(target, lam: float = 1.0):
    """The policy of `target` (trained.load_trained) as one plain causal LM in fp32 on the CPU, its
    tokenizer, and what was loaded (trained.Trained): a LoRA adapter merged into its base (PEFT's merge), a
    full model as it is; `lam` < 1 first interpolates it toward where its training started
    (Trained.interpolate)."""
    if not Path(target).exists():
        raise UsageError(f"{target}: no such folder (give a run dir or a checkpoint folder)")
    trained = load_trained(target, device="cpu")
    if trained.is_lora:
        base = trained.model.get_base_model()
        quantized = getattr(base.config, "quantization_config", None)
        if quantized is not None:
            raise UsageError(
                f"the base of {trained.source!r} is quantized ({type(quantized).__name__}): merging LoRA weights "
                "into quantized weights rounds them away. Export from the unquantized base (the same model in "
                "fp32/bf16)"
            )
    if lam != 1.0:
        trained.interpolate(lam)
    return trained.merged().eval(), trained.tokenizer, trained


def export(
    target,
    out: str,
    dtype: str = "fp32",
    gguf: str | None = None,
    gguf_type: str = "f16",
    lam: float = 1.0,
) -> Exported:
    """Write the merged folder to `out` (and a GGUF + Modelfile when `gguf` is given)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {list(DTYPES)}")
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf-type {gguf_type}: choose one of {list(GGUF_TYPES)}")
    started = time.perf_counter()
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"--out {out}: exists and is not empty; choose a new folder")
    model, tokenizer, trained = merged_model(target, lam)
    if gguf:
        check_gguf_arch(model)
    log.info("exporting %s", trained.source)
    gguf_path = modelfile = None
    if gguf:  # from the fp32 merge, before --dtype rounds the folder's weights
        gguf_path = Path(gguf)
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        write_file(gguf_path, lambda tmp: write_gguf(model, tokenizer, tmp, gguf_type, name=folder.name))
        modelfile = write_modelfile(tokenizer, gguf_path)

    card = export_card(trained, dtype, gguf_path, gguf_type)

    def save(tmp: Path) -> None:
        model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)

    build_folder(folder, save, "config.json")
    return Exported(folder, gguf_path, modelfile, time.perf_counter() - started, trained.source)


def export_card(trained, dtype: str, gguf_path: Path | None, gguf_type: str) -> str:
    """The export's model card: the run's (modelcard.py) when it comes from one, else what is known."""
    how = "a LoRA adapter merged into its base" if trained.is_lora else "a fully fine-tuned model"
    between = (
        f", interpolated to lambda={trained.lam:g} between its starting model (0) and as trained (1)"
        if trained.lam != 1.0
        else ""
    )
    note = f"Exported by `dpokit export` from {trained.source}: {how}{between}, weights in {dtype}" + (
        f"; also a GGUF ({gguf_type}) for llama.cpp / Ollama, `{gguf_path.name}`." if gguf_path else "."
    )
    run = Run.of_checkpoint(trained.checkpoint) if trained.checkpoint is not None else None
    if trained.config is None or run is None:
        return f"# {trained.source}\n\n{note}\n\nExported with dpokit {version()}.\n"
    step = Run.checkpoint_step(trained.checkpoint)
    figures = run.figures_at(step) if step is not None else None
    return model_card(trained.config, run.data_stats, figures, step, adapter=False, note=note)


# ---- GGUF


def check_gguf_arch(model) -> None:
    arch = type(model).__name__
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise UsageError(
            f"GGUF export writes the llama architecture; this model is {arch}. Export the merged folder and "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows with each head's rotary halves interleaved (convert_hf_to_gguf's permute;
    transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) of every weight, q/k permuted, tied output left out."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    out = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"GGUF export: no llama.cpp name for tensor {name!r}")
        t = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        out.append((gguf_name, t.numpy()))
    return out


def _types(gguf_type: str):
    """(tensor type of the matrices, llama.cpp file type) of a --gguf-type."""
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    return {
        "f32": (T.F32, F.ALL_F32),
        "f16": (T.F16, F.MOSTLY_F16),
        "bf16": (T.BF16, F.MOSTLY_BF16),
        "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
        "q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
    }[gguf_type]


def _tensor_type(name: str, array: np.ndarray, gguf_type: str):
    """The storage type of one tensor: vectors stay f32 (as llama.cpp's converter does); with q4_1 the
    embedding and output matrices go q8_0 (as in the shipped SmolLM2 Q4_1 file)."""
    from gguf import GGMLQuantizationType as T

    if array.ndim < 2:
        return T.F32
    if gguf_type == "q4_1" and name.split(".")[0] in ("token_embd", "output"):
        return T.Q8_0
    return _types(gguf_type)[0]


def write_gguf(model, tokenizer, path: Path, gguf_type: str, name: str = "dpokit export") -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_types(gguf_type)[1])
    if gguf_type in ("q8_0", "q4_1"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    for tensor_name, array in gguf_tensors(model):
        qtype = _tensor_type(tensor_name, array, gguf_type)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, array.astype(np.float16))
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(tensor_name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer ("gpt2" in llama.cpp): tokens, types, merges, special ids, template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}")
    vocab = {token: i for token, i in model["vocab"].items()}
    added = {a["id"]: a for a in backend.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    tokens = [""] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i] = token
    types = [
        (3 if added[i].get("special") else 4) if i in added else 1  # control, user-defined, normal
        for i in range(vocab_size)
    ]
    for i, t in enumerate(tokens):
        if not t:
            tokens[i], types[i] = f"[PAD{i}]", 5  # unused id
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # a vocabulary of single bytes (tiny-random): readers rebuild merges from scores, all equal here
        writer.add_token_scores([0.0] * vocab_size)
        log.warning(
            "the tokenizer has no BPE merges (a vocabulary of single bytes): transformers reads this GGUF, "
            "llama.cpp refuses it (it requires tokenizer.ggml.merges)"
        )
    for kind, token in (
        ("bos", tokenizer.bos_token),
        ("eos", tokenizer.eos_token),
        ("pad", tokenizer.pad_token),
        ("unk", tokenizer.unk_token),
    ):
        if token is not None and token in vocab:
            getattr(writer, f"add_{kind}_token_id")(vocab[token])
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)  # byte-level BPE marks spaces itself
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer: it keys its splitting regex. SmolLM2 (this project's embedded
    model) is "smollm"; other byte-level BPE vocabularies get llama.cpp's "default" (GPT-2 splitting)."""
    vocab = tokenizer.get_vocab()
    return "smollm" if "<|im_start|>" in vocab and len(vocab) == 49152 else "default"


# ---- Ollama


def write_modelfile(tokenizer, gguf_path: Path) -> Path:
    """An Ollama Modelfile beside the GGUF: FROM it, the ChatML template in Ollama's Go template language,
    and the stop tokens. Other chat templates are left to the user (Ollama cannot run Jinja)."""
    path = gguf_path.with_suffix(".Modelfile")
    template = tokenizer.chat_template or ""
    lines = [f"FROM ./{gguf_path.name}"]
    if "<|im_start|>" in template:
        lines.append('TEMPLATE """' + CHATML_TEMPLATE + '"""')
        lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    elif tokenizer.eos_token:
        log.warning("the chat template is not ChatML: the Modelfile has no TEMPLATE; add one for Ollama")
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path.write_text("\n".join(lines) + "\n")
    return path


CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
