import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: skipped when absent, but a failure under CI=true."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared preference data is missing at {SHARED_DATA}")
        pytest.skip(f"shared preference data not found at {SHARED_DATA} (a checkout without ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from dpokit.models import build_tiny_random

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_random(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from dpokit.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def tiny_run_overrides(model_dir, run_dir, *extra) -> list[str]:
    """The common overrides of a short tiny-model run on the shipped demo pairs."""
    return [
        f"model.name={model_dir}",
        "data.train=builtin:demo",
        "data.limit=24",
        "data.eval_fraction=0.25",
        "lora.r=4",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.lr=1e-3",
        "train.device=cpu",
        "train.progress=false",
        "train.save_final=false",
        f"train.run_dir={run_dir}",
        *extra,
    ]
