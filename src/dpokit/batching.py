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
rejected is sequence P + p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.tokenize import TokenizedPair, TokenizedUnpaired


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(R, T) token ids; padding holds pad_id."""
    position_ids: torch.Tensor
    """(R, T) positions fed to the rotary/absolute embeddings."""
    attention_mask: torch.Tensor
    """(R, T) 1/0 padding mask (causal attention implied), or (R, 1, T, T) bool, True = may attend."""
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

    @property
    def num_pairs(self) -> int:
        return self.num_seqs // 2

    @property
    def num_examples(self) -> int:
        """Pairs: what a batch's losses, weights and metrics count."""
        return self.num_pairs

    def completion_lengths(self) -> torch.Tensor:
        """(S,) completion tokens per sequence."""
        return torch.bincount(self.seq_index, minlength=self.num_seqs)

    @property
    def model_args(self) -> tuple[torch.Tensor, ...]:
        """The positional inputs of `CompletionLogps.forward`."""
        return self.input_ids, self.position_ids, self.attention_mask, self.pred_index, self.target_ids

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


@dataclass(frozen=True)
class Doc:
    """One attention document: a prompt, then one or more completions that each see only the prompt."""

    prompt: list[int]
    completions: tuple[tuple[list[int], int], ...]
    """(token ids, sequence id) of each completion."""

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(c) for c, _ in self.completions)


def pair_docs(pairs: list[TokenizedPair], prefix_share: bool) -> list[Doc]:
    P = len(pairs)
    if prefix_share:
        return [Doc(p.prompt_ids, ((p.chosen_ids, i), (p.rejected_ids, P + i))) for i, p in enumerate(pairs)]
    return [Doc(p.prompt_ids, ((p.chosen_ids, i),)) for i, p in enumerate(pairs)] + [
        Doc(p.prompt_ids, ((p.rejected_ids, P + i),)) for i, p in enumerate(pairs)
    ]


def pack_rows(docs: list[Doc], budget: int) -> list[list[int]]:
    """First-fit decreasing: document indices per row, each row holding at most `budget` tokens
    (a document longer than the budget gets a row of its own)."""
    order = sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i))
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(docs[i])
        for r, free in enumerate(space):
            if free >= n:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(budget - n)
    return [sorted(row) for row in rows]


def build_batch(
    docs: list[Doc], rows: list[list[int]], pad_id: int, weights: list[float], dense_mask: bool
) -> Batch:
    """Lay documents into rows and index every completion token (see the module docstring)."""
    R, T = len(rows), max(sum(len(docs[i]) for i in row) for row in rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    doc_of = torch.full((R, T), -1, dtype=torch.long)  # -1 = padding
    branch = torch.zeros((R, T), dtype=torch.long)  # 0 = prompt, b = b-th completion of the document
    pred, target, seq, cpos = [], [], [], []
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
                pred += [last_prompt] + list(range(r * T + t, r * T + t + n - 1))
                target += completion
                seq += [seq_id] * n
                cpos += range(n)
                t += n
    real = doc_of >= 0
    if dense_mask:
        same_doc = (doc_of.unsqueeze(2) == doc_of.unsqueeze(1)) & real.unsqueeze(2)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        visible = (branch.unsqueeze(1) == 0) | (branch.unsqueeze(2) == branch.unsqueeze(1))
        mask = same_doc & causal & visible
        mask |= torch.eye(T, dtype=torch.bool) & ~real.unsqueeze(
            2
        )  # padding sees itself: no empty softmax rows
        attention_mask = mask.unsqueeze(1)  # (R, 1, T, T)
    else:
        attention_mask = real.long()
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
    )


@dataclass(frozen=True)
class Layout:
    """How a micro-batch is laid out: prefix sharing and/or packing (both off = padded)."""

    prefix_share: bool = False
    pack: bool = False
    pack_tokens: int = 4096
    """Token budget of a packed row."""

    def rows(self, docs: list[Doc]) -> list[list[int]]:
        return pack_rows(docs, self.pack_tokens) if self.pack else [[i] for i in range(len(docs))]

    def pairs(self, pairs: list[TokenizedPair], pad_id: int, ids: list[int] | None = None) -> Batch:
        docs = pair_docs(pairs, self.prefix_share)
        # a plain padded layout keeps the 2D padding mask (causal attention implied: SDPA's fast path)
        batch = build_batch(
            docs, self.rows(docs), pad_id, [p.weight for p in pairs], self.prefix_share or self.pack
        )
        batch.example_ids = None if ids is None else torch.tensor(ids, dtype=torch.long)
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
        docs = [Doc(e.prompt_ids, ((e.completion_ids, i),)) for i, e in enumerate(examples)]
        targets = build_batch(docs, self.rows(docs), pad_id, weights, self.pack)
        targets.labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
        targets.example_ids = None if ids is None else torch.tensor(ids, dtype=torch.long)
        shifted = [
            Doc(
                e.prompt_ids,
                ((examples[(i + 1) % B].completion_ids[: max(max_length - len(e.prompt_ids), 1)], i),),
            )
            for i, e in enumerate(examples)
        ]
        return UnpairedBatch(targets, build_batch(shifted, self.rows(shifted), pad_id, [1.0] * B, self.pack))


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
