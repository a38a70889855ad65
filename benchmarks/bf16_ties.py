"""bf16 rounding ties in the converted SmolLM2 weights, and what they do to bf16 full fine-tuning.

A fp32 weight whose low 16 bits are exactly 0x8000 sits halfway between two bf16 values. Under bf16
autocast it rounds to the even neighbour; any update, however small, tips it to one side, so the bf16
forward sees a whole bf16 step (~0.4% of the weight) move in the gradient direction. Dequantized Q4_1
weights concentrate on such ties. This script measures, for the raw conversion and for the converted
folder dpokit ships (ties dithered at conversion, `models.dither_bf16_ties`):

1. the share of weights on a tie (random fp32 values: ~0.002%);
2. per-token fp32 log-probs of held-out text (HH harmless-base chosen completions) against the raw
   conversion: mean and max absolute difference in nats per token;
3. full fine-tuning on 4 HH helpful-base pairs, lr 1e-6, 5 steps, fp32 vs bf16 autocast: the margin
   (rewards/margins) at each step; the step-2 margin is the first one that sees an update.

    python benchmarks/bf16_ties.py                 # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from dpokit import models  # noqa: E402
from helpers import SHARED_DATA, load_cfg  # noqa: E402


@torch.no_grad()
def token_logps(model, tokenizer, n_texts: int) -> torch.Tensor:
    from dpokit.data import load_examples

    examples, _ = load_examples(
        str(SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"), skip_invalid=True
    )
    out = []
    for ex in examples[:n_texts]:
        ids = tokenizer(ex.prompt + ex.chosen, return_tensors="pt")["input_ids"][:, :256]
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])
        out.append(logp.flatten())
    return torch.cat(out)


def margins(model_dir: str, bf16: bool) -> list[float]:
    from dpokit.loop import train

    run = tempfile.mkdtemp(prefix="bf16-ties-")
    cfg = load_cfg(
        model_dir,
        run,
        f"data.train={SHARED_DATA / 'hh-rlhf' / 'helpful-base' / 'test.jsonl.gz'}",
        "data.skip_invalid=true",
        "data.limit=4",
        "data.eval_fraction=0",
        "data.max_length=256",
        "data.max_prompt_length=128",
        "lora.enabled=false",
        "train.batch_size=4",
        "train.max_steps=5",
        "train.lr=1e-6",
        "train.scheduler=constant",
        f"train.bf16={str(bf16).lower()}",
    )
    return [r["rewards/margins"] for r in train(cfg).history]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=32, help="held-out texts for the log-prob comparison")
    args = parser.parse_args()
    shipped = models.resolve_model_path(models.SMOLLM2_ALIAS)
    raw = Path(tempfile.mkdtemp(prefix="smollm2-raw-"))
    models.convert_gguf(models.smollm2_gguf_path(), raw, dither_ties=False)
    tokenizer = models.load_tokenizer(shipped)
    result = {}
    lp_raw = None
    for name, folder in (("raw conversion", str(raw)), ("shipped (ties dithered)", shipped)):
        model = models.load_model(folder).eval()
        lp = token_logps(model, tokenizer, args.texts)
        row = {"tie_share": models.bf16_grid_shares(model.parameters())[1]}
        if lp_raw is None:
            lp_raw = lp
        else:
            diff = (lp - lp_raw).abs()
            row.update(logp_diff_mean=float(diff.mean()), logp_diff_max=float(diff.max()), tokens=lp.numel())
        del model
        row["margins_fp32"] = margins(folder, bf16=False)
        row["margins_bf16"] = margins(folder, bf16=True)
        row["step2_bf16_over_fp32"] = row["margins_bf16"][1] / row["margins_fp32"][1]
        result[name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
