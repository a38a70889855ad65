"""Every layout with literal expected tensors: ids, positions, masks and the completion index."""

from dpokit.batching import Layout
from dpokit.tokenize import TokenizedPair

PAIRS = [TokenizedPair([5, 6], [7], [8, 9], weight=2.0), TokenizedPair([10], [11, 12], [13])]
T_, F_ = True, False


def test_padded_literal():
    b = Layout().pairs(PAIRS, pad_id=0)
    # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [10, 11, 12, 0], [5, 6, 8, 9], [10, 13, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]]  # padding: 0
    # completion tokens in row-major order: (r0,2)=7 (r1,1)=11 (r1,2)=12 (r2,2)=8 (r2,3)=9 (r3,1)=13,
    # each predicted by the state one position to the left: flat index row * 4 + col - 1.
    assert b.pred_index.tolist() == [1, 4, 5, 9, 10, 12]
    assert b.target_ids.tolist() == [7, 11, 12, 8, 9, 13]
    assert b.seq_index.tolist() == [0, 1, 1, 2, 2, 3]
    assert b.completion_pos.tolist() == [0, 0, 1, 0, 1, 0]
    assert b.completion_lengths().tolist() == [1, 2, 2, 1]
    assert b.num_seqs == 4 and b.num_pairs == 2
    assert b.weights.tolist() == [2.0, 1.0]
    assert b.num_tokens == 12


def test_prefix_shared_literal():
    b = Layout(prefix_share=True).pairs(PAIRS, pad_id=0, ids=[7, 3])
    # one row per pair: prompt, chosen, rejected; the rejected positions restart after the prompt
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
    assert b.attention_mask[0, 0].tolist() == [
        [T_, F_, F_, F_, F_],  # prompt
        [T_, T_, F_, F_, F_],
        [T_, T_, T_, F_, F_],  # chosen: prompt + itself
        [T_, T_, F_, T_, F_],  # rejected: prompt + itself, never the chosen token
        [T_, T_, F_, T_, T_],
    ]
    assert b.attention_mask[1, 0].tolist() == [
        [T_, F_, F_, F_, F_],
        [T_, T_, F_, F_, F_],
        [T_, T_, T_, F_, F_],
        [T_, F_, F_, T_, F_],
        [F_, F_, F_, F_, T_],  # padding sees only itself
    ]
    # the first rejected token is predicted by the last prompt token (flat index 1 in row 0, 5 in row 1)
    assert b.pred_index.tolist() == [1, 1, 3, 5, 6, 5]
    assert b.target_ids.tolist() == [7, 8, 9, 11, 12, 13]
    assert b.seq_index.tolist() == [0, 2, 2, 1, 1, 3]
    assert b.completion_pos.tolist() == [0, 0, 1, 0, 1, 0]
    assert b.completion_lengths().tolist() == [1, 2, 2, 1]
    assert b.num_tokens == 9 and b.example_ids.tolist() == [7, 3]


def test_packed_literal():
    b = Layout(pack=True, pack_tokens=8).pairs(PAIRS, pad_id=0)
    # documents: c0=[5,6,7] c1=[10,11,12] r0=[5,6,8,9] r1=[10,13]: 12 tokens, so ceil(12 / 8) = 2 rows, filled
    # longest first into the shorter row: r0 -> row 0, c0 -> row 1, c1 -> row 1, r1 -> row 0; 6 + 6, no padding
    assert b.input_ids.tolist() == [[5, 6, 8, 9, 10, 13], [5, 6, 7, 10, 11, 12]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    row0 = b.attention_mask[0, 0]
    assert row0[4].tolist() == [F_, F_, F_, F_, T_, F_]  # second document starts fresh
    assert row0[5].tolist() == [F_, F_, F_, F_, T_, T_]
    assert b.pred_index.tolist() == [1, 2, 4, 7, 9, 10]
    assert b.target_ids.tolist() == [8, 9, 13, 7, 11, 12]
    assert b.seq_index.tolist() == [2, 2, 3, 0, 1, 1]
    assert b.num_tokens == 12 and b.input_ids.numel() == 12


def test_pack_rows_balances_rows():
    from dpokit.batching import Doc, pack_rows

    docs = [Doc([1] * n, ()) for n in (9, 1, 5, 5, 4)]  # 24 tokens, budget 10 -> 3 rows
    rows = pack_rows(docs, 10)
    assert rows == [[0], [2, 4], [1, 3]]  # 9 | 5 + 4 | 5 + 1: longest first, each into the shortest row
    assert pack_rows(docs, 1000) == [[0, 1, 2, 3, 4]]  # one row: no padding at all
    assert len(pack_rows(docs, 1)) == 5  # never more rows than documents


def test_blocks_literal():
    b = Layout(prefix_share=True, pack=True, pack_tokens=16, attention="blocks").pairs(PAIRS, pad_id=0)
    assert b.attention_mask is None and b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    (r0, s0, n0, m0), (r1, s1, n1, m1) = b.blocks
    assert (r0, s0, n0, r1, s1, n1) == (0, 0, 5, 0, 5, 4)
    assert m0.tolist() == [  # the rule of the dense mask, on the document's own square
        [T_, F_, F_, F_, F_],
        [T_, T_, F_, F_, F_],
        [T_, T_, T_, F_, F_],
        [T_, T_, F_, T_, F_],
        [T_, T_, F_, T_, T_],
    ]
    dense = Layout(prefix_share=True, pack=True, pack_tokens=16).pairs(PAIRS, pad_id=0).attention_mask[0, 0]
    assert m1.tolist() == dense[5:, 5:].tolist()
    plain = Layout(pack=True, pack_tokens=8, attention="blocks").pairs(PAIRS, pad_id=0)
    assert [m for *_, m in plain.blocks] == [None] * 4  # one branch: plain causal attention, the fast kernel


def test_packed_prefix_shared_puts_both_pairs_in_one_row():
    b = Layout(prefix_share=True, pack=True, pack_tokens=16).pairs(PAIRS, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    assert b.pred_index.tolist() == [1, 1, 3, 5, 6, 5]
    assert b.attention_mask[0, 0, 8].tolist() == [F_, F_, F_, F_, F_, T_, F_, F_, T_]


def test_dense_rows_much_longer_than_their_documents_are_warned_about(caplog, monkeypatch):
    from dpokit import batching

    monkeypatch.setattr(batching, "_warned_dense", False)
    pairs = PAIRS * 8  # 32 documents of 2 to 4 tokens (3 on average)
    Layout(pack=True, pack_tokens=8).pairs(pairs, pad_id=0)  # rows of about 8 tokens: fine
    assert not caplog.records
    Layout(pack=True, pack_tokens=10**6).pairs(pairs, pad_id=0)  # one row of 96: 32x the documents
    assert "dense attention costs the row length squared, about 32x" in caplog.text
    assert "train.attention=blocks" in caplog.text
    caplog.clear()
    Layout(pack=True, pack_tokens=10**6, attention="blocks").pairs(pairs, pad_id=0)
    assert not caplog.records  # block attention costs what the documents cost
