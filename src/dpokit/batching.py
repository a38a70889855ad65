"""Batch layouts: the one place that turns tokenized pairs into model rows and a completion index.

Every layout is built from *documents*: a prompt followed by one completion (padded) or by both
completions of a pair (prefix sharing: the prompt is computed once). Documents go one per row
(right-padded) or several per row up to a token budget (packing). One attention rule covers all four
combinations: token i may attend to token j when both are in the same document, j is not after i, and j
is in the prompt or in i's own completion. Completion positions restart right after the prompt, so the
rejected completion sees exactly what it would see in a sequence of its own (a 4D boolean mask with
explicit position ids is exact under SDPA, tests/test_layouts.py; position ids alone do not isolate
packed rows).

The result is a `Batch` whose completion index says, for every completion token, which hidden state
predicts it (`pred_index`, a flat index into rows x positions), which token it is (`target_ids`) and which
sequence it belongs to (`seq_index`). Sequence numbering for P pairs: chosen of pair p is sequence p,
rejected is sequence P + p; when pairs share a prompt (K samples of one prompt paired several ways), the
prompt and each distinct completion are computed once and `seq_map` says which computed sequence each of
those 2P is.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

import torch

from dpokit.config import TrainConfig
from dpokit.logps import sum_by_sequence
from dpokit.tokenize import TokenizedPair, TokenizedUnpaired

log = logging.getLogger(__name__)
Block = tuple[int, int, int, "torch.Tensor | None"]
"""(row, first position, length, (length, length) bool mask or None for plain causal) of one document."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(R, T) token ids; padding holds pad_id."""
    position_ids: torch.Tensor
    """(R, T) positions fed to the rotary/absolute embeddings."""
    attention_mask: torch.Tensor | None
    """(R, T) 1/0 padding mask (causal attention implied), (R, 1, T, T) bool (True = may attend), or None
    with `blocks`."""
    pred_index: torch.Tensor
    """(N,) flat index (row * T + position) of the hidden state that predicts each completion token."""
    target_ids: torch.Tensor
    """(N,) the completion tokens."""
    seq_index: torch.Tensor
    """(N,) sequence each completion token belongs to, in [0, num_seqs)."""
    completion_pos: torch.Tensor
    """(N,) position of each token inside its completion (0 = first completion token)."""
    num_seqs: int
    weights: torch.Tensor
    """(P,) per-pair weights (1.0 unless the data gives a `weight`)."""
    num_tokens: int
    """Real (non-padding) tokens in the rows: the work the forward pass does."""
    example_ids: torch.Tensor | None = None
    """(P,) or (B,) index of each pair/example in its data split (keys the precomputed reference cache)."""
    labels: torch.Tensor | None = None
    """(B,) bool desirability of unpaired examples (KTO); None for pairs."""
    blocks: list[Block] | None = None
    """Per-document attention (attention.py): (row, start, length, mask or None) of every document."""
    seq_map: torch.Tensor | None = None
    """(2P,) the computed sequence that is chosen of pair p (entry p) and rejected of pair p (entry P + p),
    when pairs share completions (several pairs of one prompt: each distinct completion is computed once);
    None when sequence p / P + p are those themselves."""
    last_index: torch.Tensor | None = None
    """(S,) flat index (row * T + position) of each sequence's last token that is not padding: where a
    sequence-classification head reads its score (transformers pools the last non-pad token; with pad ==
    EOS, the token before an appended EOS)."""
    margins: torch.Tensor | None = None
    """(P,) per-pair margin a reward model's chosen score must win by (a `margin` column; 0 without)."""
    score_gaps: torch.Tensor | None = None
    """(P,) score_chosen - score_rejected of each pair; None unless every pair of the batch has both."""

    @property
    def num_pairs(self) -> int:
        return (self.seq_map.numel() if self.seq_map is not None else self.num_seqs) // 2

    @property
    def num_examples(self) -> int:
        """Pairs: what a batch's losses, weights and metrics count."""
        return self.num_pairs

    def sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per-token values -> (2P,) sums per chosen / rejected sequence (or (S,) for other batches)."""
        sums = sum_by_sequence(values, self.seq_index, self.num_seqs)
        return sums if self.seq_map is None else sums[self.seq_map]

    def completion_lengths(self) -> torch.Tensor:
        """(2P,) completion tokens per chosen / rejected sequence (or (S,) for other batches)."""
        lengths = torch.bincount(self.seq_index, minlength=self.num_seqs)
        return lengths if self.seq_map is None else lengths[self.seq_map]

    @property
    def model_args(self) -> tuple:
        """The positional inputs of `CompletionLogps.forward`."""
        return (
            self.input_ids,
            self.position_ids,
            self.attention_mask,
            self.pred_index,
            self.target_ids,
            self.blocks,
        )

    @property
    def reward_args(self) -> tuple:
        """The positional inputs of `RewardScores.forward` (a reward model's score per sequence)."""
        return (self.input_ids, self.position_ids, self.attention_mask, self.last_index, self.blocks)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        if self.blocks is not None:
            moved["blocks"] = [(r, s, n, None if m is None else m.to(device)) for r, s, n, m in self.blocks]
        return Batch(**moved)


@dataclass(frozen=True)
class Doc:
    """One attention document: a prompt, then one or more completions that each see only the prompt."""

    prompt: list[int]
    completions: tuple[tuple[list[int], int], ...]
    """(token ids, sequence id) of each completion."""
    targets: tuple | None = None
    """Per completion, which of its tokens are scored (a bool per token), or None for all of them; None:
    every token of every completion. The others are context: in the rows, out of the completion index."""

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(c) for c, _ in self.completions)


def _targets(*masks) -> tuple | None:
    return None if all(m is None for m in masks) else masks


def pair_docs(pairs: list[TokenizedPair], prefix_share: bool) -> list[Doc]:
    P = len(pairs)
    if prefix_share:
        return [
            Doc(
                p.prompt_ids,
                ((p.chosen_ids, i), (p.rejected_ids, P + i)),
                _targets(p.chosen_targets, p.rejected_targets),
            )
            for i, p in enumerate(pairs)
        ]
    return [
        Doc(p.prompt_ids, ((p.chosen_ids, i),), _targets(p.chosen_targets)) for i, p in enumerate(pairs)
    ] + [
        Doc(p.prompt_ids, ((p.rejected_ids, P + i),), _targets(p.rejected_targets))
        for i, p in enumerate(pairs)
    ]


def branch_docs(pairs: list[TokenizedPair]) -> tuple[list[Doc], torch.Tensor] | None:
    """One document per distinct prompt, with one branch per distinct completion of its pairs (1 prompt +
    N branches), and the (2P,) map from chosen p / rejected P + p to those branches' sequence ids; None
    when no two pairs share a prompt (pair_docs is that layout already)."""
    docs: dict[tuple, list] = {}  # prompt ids -> [prompt, {(completion ids, targets): sequence id}]
    seq_map, next_id = [], 0
    for side in ("chosen", "rejected"):
        for p in pairs:
            doc = docs.setdefault(tuple(p.prompt_ids), [p.prompt_ids, {}])
            completion = (tuple(getattr(p, f"{side}_ids")), getattr(p, f"{side}_targets"))
            if completion not in doc[1]:
                doc[1][completion] = next_id
                next_id += 1
            seq_map.append(doc[1][completion])
    if len(docs) == len(pairs):
        return None
    built = [
        Doc(
            prompt,
            tuple((list(c), i) for (c, _), i in branches.items()),
            _targets(*(t for _, t in branches)),
        )
        for prompt, branches in docs.values()
    ]
    return built, torch.tensor(seq_map, dtype=torch.long)


def pack_rows(docs: list[Doc], budget: int) -> list[list[int]]:
    """Document indices per row: as many rows as `budget` tokens a row asks for (ceil(total / budget)), filled
    to nearly equal lengths, longest document first into the shortest row, so that padding to the longest
    row costs little. A row exceeds the budget by less than one document."""
    total = sum(len(d) for d in docs)
    n_rows = max(1, min(len(docs), math.ceil(total / budget)))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    loads = [(0, r) for r in range(n_rows)]  # (tokens so far, row): a min-heap
    for i in sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i)):
        load, r = heapq.heappop(loads)
        rows[r].append(i)
        heapq.heappush(loads, (load + len(docs[i]), r))
    return [sorted(row) for row in rows if row]


def doc_blocks(docs: list[Doc], rows: list[list[int]]) -> list[Block]:
    """Where each document lies in its row, and its attention mask: plain causal (None) with one branch,
    else the rule of the module docstring on its own (length x length) square."""
    blocks = []
    for r, row in enumerate(rows):
        start = 0
        for d in row:
            doc, n = docs[d], len(docs[d])
            mask = None
            if len(doc.completions) > 1:
                branch = torch.cat(
                    [torch.zeros(len(doc.prompt), dtype=torch.long)]
                    + [
                        torch.full((len(c),), b, dtype=torch.long)
                        for b, (c, _) in enumerate(doc.completions, start=1)
                    ]
                )
                visible = (branch.unsqueeze(0) == 0) | (branch.unsqueeze(1) == branch.unsqueeze(0))
                mask = torch.ones(n, n, dtype=torch.bool).tril() & visible
            blocks.append((r, start, n, mask))
            start += n
    return blocks


MASKS = ("padding", "dense", "blocks")
DENSE_ROW_WARN = 8.0
"""Warn when a densely masked packed row is this many times longer than its documents on average. Measured
(docs/performance.md, HH pairs, reference pass): rows 5.5x their documents (pack_tokens 1024) cost no more
than shorter ones, rows 12x and 24x (2048, 4096) cost 1.3x and 2x: linear layers dominate until then."""
_warned_dense = False


def build_batch(
    docs: list[Doc], rows: list[list[int]], pad_id: int, weights: list[float], mask: str
) -> Batch:
    """Lay documents into rows and index every completion token (see the module docstring).

    `mask`: padding (one document per row, a 2D padding mask: SDPA's fast causal path), dense (the rule as
    one (R, 1, T, T) mask: the reference implementation) or blocks (per-document attention, attention.py).
    """
    R, T = len(rows), max(sum(len(docs[i]) for i in row) for row in rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    doc_of = torch.full((R, T), -1, dtype=torch.long)  # -1 = padding
    branch = torch.zeros((R, T), dtype=torch.long)  # 0 = prompt, b = b-th completion of the document
    pred, target, seq, cpos = [], [], [], []
    last: dict[int, int] = {}  # sequence id -> flat index of its last non-pad token
    for r, row in enumerate(rows):
        t = 0
        for d in row:
            doc = docs[d]
            p = len(doc.prompt)
            if p == 0:
                raise ValueError(
                    "a document with an empty prompt has no token to predict its first completion token"
                )
            input_ids[r, t : t + p] = torch.tensor(doc.prompt)
            position_ids[r, t : t + p] = torch.arange(p)
            doc_of[r, t : t + p] = d
            last_prompt = r * T + t + p - 1
            t += p
            for b, (completion, seq_id) in enumerate(doc.completions, start=1):
                n = len(completion)
                input_ids[r, t : t + n] = torch.tensor(completion)
                position_ids[r, t : t + n] = torch.arange(p, p + n)  # restart right after the prompt
                doc_of[r, t : t + n], branch[r, t : t + n] = d, b
                # the shift: token k is predicted by the state before it; the first by the prompt's last token
                preds = [last_prompt] + list(range(r * T + t, r * T + t + n - 1))
                scored = doc.targets[b - 1] if doc.targets is not None else None
                keep = range(n) if scored is None else [k for k in range(n) if scored[k]]
                pred += [preds[k] for k in keep]
                target += [completion[k] for k in keep]
                seq += [seq_id] * len(keep)
                cpos += range(len(keep))  # position among the scored tokens (LD-DPO's shared length)
                real = [k for k in range(n) if completion[k] != pad_id]
                last[seq_id] = r * T + t + real[-1] if real else last_prompt
                t += n
    real = doc_of >= 0
    attention_mask, blocks = None, None
    if mask == "padding":
        attention_mask = real.long()
    elif mask == "dense":
        attention_mask = dense_mask(doc_of, branch)
        _warn_long_dense_rows(docs, rows, T)
    else:
        blocks = doc_blocks(docs, rows)
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        pred_index=torch.tensor(pred, dtype=torch.long),
        target_ids=torch.tensor(target, dtype=torch.long),
        seq_index=torch.tensor(seq, dtype=torch.long),
        completion_pos=torch.tensor(cpos, dtype=torch.long),
        num_seqs=sum(len(doc.completions) for doc in docs),
        weights=torch.tensor(weights, dtype=torch.float32),
        num_tokens=int(real.sum()),
        blocks=blocks,
        last_index=torch.tensor([last[i] for i in range(len(last))], dtype=torch.long),
    )


def dense_mask(doc_of: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: the attention rule over whole rows (True = may attend)."""
    T = doc_of.shape[1]
    real = doc_of >= 0
    same_doc = (doc_of.unsqueeze(2) == doc_of.unsqueeze(1)) & real.unsqueeze(2)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = (branch.unsqueeze(1) == 0) | (branch.unsqueeze(2) == branch.unsqueeze(1))
    mask = same_doc & causal & visible
    mask |= torch.eye(T, dtype=torch.bool) & ~real.unsqueeze(2)  # padding sees itself: no empty softmax rows
    return mask.unsqueeze(1)


def _warn_long_dense_rows(docs: list[Doc], rows: list[list[int]], T: int) -> None:
    """Dense attention costs the row length squared: say so once when rows dwarf their documents."""
    global _warned_dense
    mean_doc = sum(len(d) for d in docs) / max(len(docs), 1)
    if _warned_dense or max(len(r) for r in rows) < 2 or T < DENSE_ROW_WARN * mean_doc:
        return
    _warned_dense = True
    log.warning(
        "packed rows of %d tokens hold documents of %.0f tokens on average: dense attention costs the row length "
        "squared, about %.0fx what the documents need. Use train.attention=blocks, or lower train.pack_tokens.",
        T,
        mean_doc,
        T / mean_doc,
    )


@dataclass(frozen=True)
class Layout:
    """How a micro-batch is laid out: prefix sharing and/or packing (both off = padded), and how the rows
    of those two attend (`attention`: blocks, or dense as the reference implementation)."""

    prefix_share: bool = False
    pack: bool = False
    pack_tokens: int = 4096
    """Target tokens of a packed row (see pack_rows)."""
    attention: str = "dense"
    """blocks or dense; the model must run block attention for blocks (attention.enable_blocks)."""
    share_completions: bool = True
    """With prefix sharing, pairs of one prompt in a micro-batch share one document: the prompt and each
    distinct completion computed once (off for per-pair token weights: LD-DPO)."""

    def rows(self, docs: list[Doc]) -> list[list[int]]:
        return pack_rows(docs, self.pack_tokens) if self.pack else [[i] for i in range(len(docs))]

    def mask(self, prefix_share: bool) -> str:
        return "padding" if not (prefix_share or self.pack) else self.attention

    def pairs(self, pairs: list[TokenizedPair], pad_id: int, ids: list[int] | None = None) -> Batch:
        shared = branch_docs(pairs) if self.prefix_share and self.share_completions else None
        docs, seq_map = shared if shared is not None else (pair_docs(pairs, self.prefix_share), None)
        batch = build_batch(
            docs, self.rows(docs), pad_id, [p.weight for p in pairs], self.mask(self.prefix_share)
        )
        batch.seq_map = seq_map
        batch.example_ids = None if ids is None else torch.tensor(ids, dtype=torch.long)
        batch.margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        if all(p.score_gap is not None for p in pairs):
            batch.score_gaps = torch.tensor([p.score_gap for p in pairs], dtype=torch.float32)
        return batch

    def unpaired(
        self, examples: list[TokenizedUnpaired], pad_id: int, max_length: int, ids: list[int] | None = None
    ) -> UnpairedBatch:
        """Targets and mismatched batches for KTO.

        The mismatched batch pairs prompt i with the completion of example (i + 1) mod B (cut to fit
        max_length): its log-ratios estimate KL(pi_theta || pi_ref), the KTO baseline z0 (arXiv:2402.01306).
        """
        B = len(examples)
        weights = [e.weight for e in examples]
        docs = [
            Doc(e.prompt_ids, ((e.completion_ids, i),), _targets(e.completion_targets))
            for i, e in enumerate(examples)
        ]
        targets = build_batch(docs, self.rows(docs), pad_id, weights, self.mask(False))
        targets.labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
        targets.example_ids = None if ids is None else torch.tensor(ids, dtype=torch.long)
        shifted = [
            Doc(
                e.prompt_ids,
                ((examples[(i + 1) % B].completion_ids[: max(max_length - len(e.prompt_ids), 1)], i),),
            )
            for i, e in enumerate(examples)
        ]
        return UnpairedBatch(
            targets, build_batch(shifted, self.rows(shifted), pad_id, [1.0] * B, self.mask(False))
        )


@dataclass
class UnpairedBatch:
    """Unpaired examples (KTO): the examples themselves, and the mismatched prompt/completion pairs whose
    log-ratios estimate the KL baseline."""

    targets: Batch
    """(B examples) with `labels` set."""
    mismatched: Batch
    """(B sequences): prompt i with the completion of example (i + 1) mod B."""

    @property
    def weights(self) -> torch.Tensor:
        return self.targets.weights

    @property
    def num_tokens(self) -> int:
        return self.targets.num_tokens + self.mismatched.num_tokens

    @property
    def num_examples(self) -> int:
        return self.targets.num_seqs

    def to(self, device: torch.device | str) -> UnpairedBatch:
        return UnpairedBatch(self.targets.to(device), self.mismatched.to(device))


def layout_for(
    train: TrainConfig, models, max_length: int | None = None, share_completions: bool = True
) -> Layout:
    """The layout of train.prefix_sharing / packing / pack_tokens / attention for `models` (the policy and a
    separate reference): block attention when asked for and every one of them can run it (they are switched
    to it), else dense masks. `max_length`: the longest sequence (a sliding window narrower than it needs
    dense masks); `share_completions`: off for per-pair token weights (LD-DPO)."""
    from dpokit.attention import enable_blocks

    attention = train.attention
    if attention == "blocks" and (train.prefix_sharing or train.packing):
        if not all(enable_blocks(m, max_length) for m in models):
            log.info(
                "train.attention=blocks: a model attends otherwise (eager, soft-capped or windowed); using dense masks"
            )
            attention = "dense"
    return Layout(
        train.prefix_sharing,
        train.packing,
        train.pack_tokens or 2 * (max_length or 1024),
        attention,
        share_completions=share_completions,
    )
