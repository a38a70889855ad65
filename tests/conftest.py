import os
import shutil

import pytest

from helpers import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data beside the checkout: skipped when absent, but a failure under CI=true."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared preference data is missing at {SHARED_DATA}")
        pytest.skip(f"shared preference data not found at {SHARED_DATA} (a checkout without ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dpokit.models import build_tiny_random

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_random(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from dpokit.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its LM head tied to the embeddings (as SmolLM2's is)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tied-model")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), tie_word_embeddings=True)
    model.tie_weights()  # its checkpoint has an untied head; the embeddings are the tied pair's weights now
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_model_dir, tmp_path_factory):
    """One finished LoRA run of the tiny model, shared by the tests that read a run without changing it:
    TINY_RUN (18 train / 6 eval pairs, 3 steps) at lr 5e-3, a resumable checkpoint after every step, the
    final one at step 3. A test that writes into a run copies it first (copy_run)."""
    from dpokit.loop import train
    from helpers import load_cfg

    out = tmp_path_factory.mktemp("lora-run") / "run"
    return train(
        load_cfg(tiny_model_dir, out, "train.save_final=true", "train.lr=5e-3", "train.checkpoint_every=1")
    )


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, headless, driven through chromedriver (selenium); its console log is kept."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "CI=true but chromium / chromedriver are missing (make test installs Debian's chromium)"
            )
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make browser`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()
