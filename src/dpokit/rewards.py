"""Reward functions for scoring generations: a small registry plus user functions.

A reward takes the prompts and the completions (two lists of equal length) and returns one float per
completion. Choose one with a spec string:

- `vader`: VADER sentiment (the `vaderSentiment` package, which ships its lexicon), compound score of the
  completion in [-1, 1]; `vader:full` scores prompt + completion;
- `length` (characters), `length:words`, `length:tokens=MODEL` (tokens of MODEL's tokenizer);
- `keywords:good,great,-bad` : +1 per occurrence of each word (whole word, case-insensitive), -1 for the
  words written with a leading minus;
- `regex:PATTERN` : 1.0 when PATTERN matches the completion, else 0.0;
- `model:PATH` : a local Hugging Face sequence-classification folder (a reward model); the score is the
  logit of label 0 for a one-label head, else `model:PATH@LABEL` picks a label by index or name;
- `package.module:function` : any importable function `fn(prompts, completions) -> list[float]`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from dpokit.errors import RewardError

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


def vader(on: str = "completion") -> RewardFn:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:  # pragma: no cover - a dependency of dpokit
        raise RewardError(
            "reward 'vader' needs the vaderSentiment package: pip install vaderSentiment"
        ) from err
    if on not in ("completion", "full"):
        raise RewardError(f"reward 'vader:{on}': the option is 'full' (score prompt + completion) or nothing")
    analyzer = SentimentIntensityAnalyzer()

    def score(prompts, completions):
        texts = (
            completions if on == "completion" else [p + c for p, c in zip(prompts, completions, strict=True)]
        )
        return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]

    return score


def length(unit: str = "chars") -> RewardFn:
    if unit in ("", "chars"):
        return lambda prompts, completions: [float(len(c)) for c in completions]
    if unit == "words":
        return lambda prompts, completions: [float(len(c.split())) for c in completions]
    if unit.startswith("tokens="):
        from dpokit.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(unit.split("=", 1)[1]))
        return lambda prompts, completions: [
            float(len(ids)) for ids in tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        ]
    raise RewardError(f"reward 'length:{unit}': the unit is chars, words or tokens=MODEL")


def keywords(spec: str) -> RewardFn:
    words = [w.strip() for w in spec.split(",") if w.strip()]
    if not words:
        raise RewardError("reward 'keywords:': give a comma-separated word list, e.g. keywords:great,-awful")
    patterns = [
        (re.compile(rf"\b{re.escape(w.lstrip('-'))}\b", re.IGNORECASE), -1.0 if w.startswith("-") else 1.0)
        for w in words
    ]

    def score(prompts, completions):
        return [sum(sign * len(p.findall(c)) for p, sign in patterns) for c in completions]

    return score


def regex(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise RewardError(f"reward 'regex:{pattern}': not a valid regular expression ({err})") from err
    return lambda prompts, completions: [1.0 if compiled.search(c) else 0.0 for c in completions]


def reward_model(spec: str, batch_size: int = 16, device: str | None = None) -> RewardFn:
    """A local sequence-classification model; scores prompt + completion as a reward model trains on them
    (`trained_ids`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _, label = spec.partition("@")
    if (Path(path) / "config.yaml").is_file() and (Path(path) / "reward_model").is_dir():
        path = str(Path(path) / "reward_model")  # a `dpokit train-rm` run: its reward model
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    except OSError as err:
        raise RewardError(
            f"reward 'model:{spec}': cannot load a sequence-classification model from {path!r} ({err})"
        ) from err
    if device:
        model.to(device)
    if label == "":
        index = 0
    elif label.isdigit():
        index = int(label)
    else:
        names = {v: k for k, v in model.config.id2label.items()}
        if label not in names:
            raise RewardError(f"reward 'model:{spec}': no label {label!r}; the model has {sorted(names)}")
        index = names[label]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None

    @torch.no_grad()
    def score(prompts, completions):
        ids = [
            trained_ids(p, c, tokenizer)[-limit if limit else 0 :]
            for p, c in zip(prompts, completions, strict=True)
        ]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths: less padding
        out = [0.0] * len(ids)
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            chunk = [ids[i] for i in rows]
            width = max(map(len, chunk))
            input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
            logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for i, value in zip(rows, logits[:, index].float().tolist(), strict=True):
                out[i] = value
        return out

    score.reads_messages = True
    return score


def trained_ids(prompt, completion: str, tokenizer) -> list[int]:
    """The tokens a reward model scores for prompt + completion, as `dpokit train-rm` (and TRL's
    RewardTrainer) formed them in training: a chat prompt (messages) through the chat template with the
    completion as the assistant's message; a text prompt as prompt + completion + EOS."""
    from dpokit.tokenize import encode_completion, encode_prompt

    if isinstance(prompt, list):
        prompt_ids = encode_prompt(prompt, tokenizer)
        answer = [{"role": "assistant", "content": completion}]
        return prompt_ids + encode_completion(prompt, prompt_ids, answer, tokenizer, "reward", "completion")
    eos = tokenizer.eos_token or ""
    return tokenizer(prompt + completion if completion.endswith(eos) else prompt + completion + eos)[
        "input_ids"
    ]


def prompt_texts(prompts: list, tokenizer) -> list[str]:
    """Prompts as text: chat messages through the policy's chat template, up to the assistant's header (the
    text the policy continued)."""
    from dpokit.tokenize import render

    return [p if isinstance(p, str) else render(tokenizer, p, add_generation_prompt=True) for p in prompts]


def score_samples(reward: RewardFn, prompts: list, completions: list[str], tokenizer) -> list[float]:
    """`reward` of each completion of its prompt: a reward model (`model:PATH`) gets chat prompts as messages
    and scores them as it was trained; any other reward gets the prompts as text (`prompt_texts`)."""
    reads_messages = getattr(reward, "reads_messages", False)
    return reward(prompts if reads_messages else prompt_texts(prompts, tokenizer), completions)


def user_function(spec: str, kind: str = "reward", near: tuple = ()):
    """The function `module:function` names (a reward, or a judge): imported from sys.path (the current
    folder, PYTHONPATH), else from the folders `near` (the config file's folder)."""
    module, _, name = spec.partition(":")
    builtin = f"not a built-in reward ({', '.join(BUILTIN)}) and " if kind == "reward" else ""
    try:
        fn = getattr(_import_near(module, near), name)
    except ModuleNotFoundError as err:
        where = ", ".join(["the current folder", "PYTHONPATH", *(str(p) for p in near)])
        raise RewardError(
            f"{kind} {spec!r}: {builtin}module {module!r} is not found ({err}; looked in {where}). Fix: run "
            f"from the folder that holds {module.split('.')[0]}.py, or set PYTHONPATH=THAT_FOLDER"
        ) from err
    except (ImportError, AttributeError) as err:
        raise RewardError(
            f"{kind} {spec!r}: {builtin}cannot import {name!r} from module {module!r} ({err})"
        ) from err
    if not callable(fn):
        raise RewardError(f"{kind} {spec!r}: {module}.{name} is not callable")
    return fn


def _import_near(module: str, near: tuple):
    import sys

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0]:  # the module was found and failed to import something itself
            raise
        for folder in near:
            if (Path(folder) / f"{module.split('.')[0]}.py").is_file() or (
                Path(folder) / module.split(".")[0]
            ).is_dir():
                sys.path.insert(0, str(folder))
                return importlib.import_module(module)
        raise


BUILTIN = {
    "vader": lambda arg: vader(arg or "completion"),
    "length": lambda arg: length(arg or "chars"),
    "keywords": keywords,
    "regex": regex,
    "model": reward_model,
}


PYTHON = "python"
"""The spec prefix a run's config records for a function given from Python (`python:NAME`)."""


def python_spec(fn) -> str:
    return f"{PYTHON}:{getattr(fn, '__qualname__', None) or type(fn).__name__}"


def as_reward(reward, near: tuple = ()) -> RewardFn:
    """A reward spec, or a Python callable `fn(prompts, completions) -> list[float]` (checked the same way);
    `near`: folders where a module:function may also lie (the config file's)."""
    if callable(reward):
        return _checked(python_spec(reward), reward)
    return get_reward(reward, near)


def get_reward(spec: str, near: tuple = ()) -> RewardFn:
    """Build the reward named by `spec` (see the module docstring); the result checks what it returns."""
    name, _, arg = spec.partition(":")
    if name == PYTHON:
        raise RewardError(_python_only("reward", spec))
    if name in BUILTIN:
        fn = BUILTIN[name](arg)
    elif arg:
        fn = user_function(spec, near=near)
    else:
        raise RewardError(f"reward {spec!r}: unknown reward. Known: {', '.join(BUILTIN)}, or module:function")
    return _checked(spec, fn)


def _checked(spec: str, fn: RewardFn) -> RewardFn:
    def score(prompts, completions):
        prompts, completions = list(prompts), list(completions)
        try:
            returned = fn(prompts, completions)
        except Exception as err:  # a user's function: its failure is said in one line, with the sample
            raise RewardError(_raised(spec, fn, err, prompts, completions)) from err
        try:
            returned = list(returned)
        except TypeError:
            raise RewardError(
                f"reward {spec!r} returned {type(returned).__name__}, not a list of {len(completions)} numbers"
            ) from None
        if len(returned) != len(completions):
            raise RewardError(
                f"reward {spec!r} returned {len(returned)} scores for {len(completions)} completions"
            )
        return [checked_number(f"reward {spec!r}", v, i, completions[i]) for i, v in enumerate(returned)]

    score.reads_messages = getattr(fn, "reads_messages", False)

    return score


def _raised(spec: str, fn, err: Exception, prompts: list, completions: list, probe: int = 256) -> str:
    """What a reward that raised says: the error and the first sample it raises on alone (the first
    `probe` are tried one by one), else the batch."""
    what = f"{type(err).__name__}: {err}"
    for i, (p, c) in enumerate(zip(prompts[:probe], completions[:probe], strict=True)):
        try:
            fn([p], [c])
        except Exception as one:
            return f"reward {spec!r} raised {type(one).__name__}: {one} on sample {i} ({_shown(c)!r})"
    return f"reward {spec!r} raised {what} on a batch of {len(completions)} completions"


def _shown(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def checked_number(who: str, value, index: int, text: str) -> float:
    """`value` as a finite float, else a RewardError naming `who` and the sample."""
    shown = _shown(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise RewardError(f"{who} returned {value!r} for sample {index} ({shown!r}): not a number")
    number = float(value)
    if not math.isfinite(number):
        raise RewardError(f"{who} returned {number} for sample {index} ({shown!r}): scores must be finite")
    return number


Judge = Callable[[str, str, str], float]


def _python_only(kind: str, spec: str) -> str:
    return (
        f"{kind} {spec!r} was a Python function given to the Python API; a config cannot name it. Give it "
        f"again from Python ({kind}=fn, e.g. dpokit.iterate(resume=RUN, {kind}=fn)), or name an importable "
        "module:function in the config"
    )


def as_judge(judge, near: tuple = ()) -> Judge:
    """A judge spec, or a Python callable `fn(prompt, a, b) -> P(a better than b)` (checked the same way)."""
    if callable(judge):
        return _checked_judge(python_spec(judge), judge)
    return get_judge(judge, near)


def get_judge(spec: str, near: tuple = ()) -> Judge:
    """A pairwise judge `module:function(prompt, a, b) -> P(a better than b)`, checked per call."""
    if spec.partition(":")[0] == PYTHON:
        raise RewardError(_python_only("judge", spec))
    return _checked_judge(spec, user_function(spec, "judge", near))


def _checked_judge(spec: str, fn) -> Judge:

    def judge(prompt: str, a: str, b: str) -> float:
        try:
            returned = fn(prompt, a, b)
        except Exception as err:  # a user's function: one line, with the pair
            raise RewardError(
                f"judge {spec!r} raised {type(err).__name__}: {err} on ({_shown(a)!r} vs {_shown(b)!r})"
            ) from err
        p = checked_number(f"judge {spec!r}", returned, 0, a)
        if not 0.0 <= p <= 1.0:
            raise RewardError(
                f"judge {spec!r} returned {p} for ({a[:40]!r} vs {b[:40]!r}): expected P(a better) in [0, 1]"
            )
        return p

    return judge
