"""LightRNN's 2-D factorised embedding and softmax (train_gpt2_lightrnn.py): what the idea promises, as tests.

Li et al. 2016, section 3: every id is one cell (row, column) of an R x C table; the input vector is the row's plus
the column's, and p(id | h) = p(row | h) p(col | h, row). The generic tests (test_causality.py, tests/test_model.py,
tests/test_sample.py, ...) cover the script too, the column factor included (causal_outputs returns it, one token
ahead: it conditions on the next token's row). These check the LightRNN specifics: the table is a bijection onto its
used cells; the joint over every cell is normalised with no mass on empty cells; the training loss is -log of the
product computed by hand and agrees with the full distribution decoding uses; the frequency placement is deterministic,
ranked by the train shards' counts, and survives checkpoints and resumes; sampling only emits ids of used cells;
parameters and FLOPs at 124M; bad flags are clear errors. Against the v3 baseline: the record's init on both factors,
and at the record's 11 layers (skip, backout, XSA, key offset, smear, bigram hash) the factorised model still decodes
from its cache as it computes in full, keeps documents apart and is causal. (Compiled = eager, the table's lookups and
the empty-cell mask inside the graphs: tests/test_compile.py, for every script.)
"""
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sample
from test_causality import find_leaks
from tests.helpers import ROOT, load_script, random_model, small_args
from tests.test_attention import document_leaks
from tests.test_v3 import DEEP  # the record's 11 layers at width 64: every v3 piece in play

lightrnn = load_script(ROOT / "train_gpt2_lightrnn.py")


def build(*flags):
    """A tiny fp32 model with random weights; vocab 512 in a 23 x 23 table by default: 17 empty cells, all in column
    22 (rows 6..22), so the empty-cell masking is exercised."""
    return random_model(lightrnn, "--vocab_size=512", *flags)


def cell_probabilities(model, x):
    """p(row, col) for every cell (..., R, C), from the two factors: the column softmax of each row in turn."""
    per_row = []
    for r in range(model.rows):
        rows = torch.full(x.shape[:-1], r, dtype=torch.long)
        row_logits, col_logits = model.factor_logits(x, rows)
        per_row.append(row_logits.log_softmax(-1)[..., r, None] + col_logits.log_softmax(-1))
    return torch.stack(per_row, dim=-2).exp()


@pytest.mark.parametrize("vocab, rows", [(50304, 225), (512, 23), (256, 12), (256, 16), (7, 3)])
@pytest.mark.parametrize("counted", [False, True])
def test_the_table_is_a_bijection_onto_the_used_cells(vocab, rows, counted):
    counts = np.random.default_rng(0).integers(0, 1000, vocab) if counted else None
    token_row, token_col = lightrnn.lightrnn_table(vocab, rows, counts)
    cols = -(-vocab // rows)
    cells = token_row * cols + token_col
    assert token_row.min() >= 0 and token_row.max() < rows and token_col.min() >= 0 and token_col.max() < cols
    assert len(set(cells.tolist())) == vocab  # no two ids share a cell; every id has one
    assert rows * cols - vocab < rows  # fewer empty cells than one column: the table is as small as R allows


def test_the_models_buffers_hold_the_table_and_its_inverse():
    model = build()
    assert (model.rows, model.cols) == (23, 23) and lightrnn.GPTConfig(vocab_size=50304).lightrnn_rows == 225
    used = model.cell_token >= 0
    assert int(used.sum()) == 512 and torch.equal(model.cell_token[used].sort().values, torch.arange(512))
    ids = torch.arange(512)
    assert torch.equal(model.cell_token[model.token_row * model.cols + model.token_col], ids)
    empty = {r * 23 + 22 for r in range(6, 23)}  # snaking: column 22 runs down rows 0..5 only
    assert set((~used).nonzero().flatten().tolist()) == empty


def test_the_joint_over_every_cell_sums_to_one_and_empty_cells_get_nothing():
    model = build()
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.hidden(idx, model.masks(idx)[0])
        cells = cell_probabilities(model, x)  # (2, 16, R, C), fp32
        logits = model(idx)
    torch.testing.assert_close(cells.sum((-2, -1)), torch.ones(2, 16), atol=1e-5, rtol=0)
    assert torch.all(cells.flatten(-2)[..., model.cell_token < 0] == 0)
    # the ids' distribution is the cells' one, reordered: nothing lost to empty cells, so sampling the ids (sample.py's
    # softmax) is sampling a row, then a column
    torch.testing.assert_close(logits.exp(), cells.flatten(-2)[..., model.token_row * model.cols + model.token_col])
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 16), atol=1e-5, rtol=0)
    assert cells.flatten(-2)[..., model.cell_token >= 0].std() > 1e-4  # random weights: far from uniform


def test_the_loss_is_minus_log_of_the_product_computed_by_hand():
    """-log p(row | h) - log p(col | h, row), each factor a softmax of the record's logit transform 23 sigmoid((z +
    5) / 7.5) (the script's 11.5 tanh((z + 5) / 15) differs by a constant), p(col | h, row) over the row's used
    columns of z = w_c . (h * g_row), written out per token in float64; targets -1 count for nothing; and -log of
    the full distribution at the targets."""
    model = build()
    gen = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 512, (2, 16), generator=gen), torch.randint(0, 512, (2, 16), generator=gen)
    targets[0, :4] = torch.tensor([500, 505, 511, 21])  # ids in rows with an empty cell and in full rows
    targets[1, -3:] = -1
    with torch.no_grad():
        loss = model(idx, targets)
        logits = model(idx)
        h = model.hidden(idx, model.masks(idx)[0]).double().flatten(0, 1)
    terms = []
    w_row, w_col = model.lm_head.row.weight.double(), model.lm_head.col.weight.double()
    for n, t in enumerate(targets.flatten().tolist()):
        if t < 0:
            continue
        r, c = int(model.token_row[t]), int(model.token_col[t])
        row_scores = (23 * torch.sigmoid((w_row @ h[n] + 5) / 7.5)).exp()
        col_scores = (23 * torch.sigmoid((w_col @ (h[n] * model.lm_head_col_gate[r].double()) + 5) / 7.5)).exp()
        col_scores = col_scores[model.cell_token.view(23, 23)[r] >= 0]  # the row's used cells, in column order
        used_before = int((model.cell_token.view(23, 23)[r, :c] >= 0).sum())
        p = row_scores[r] / row_scores.sum() * col_scores[used_before] / col_scores.sum()
        terms.append(-p.log())
    assert len(terms) == 29 and loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    keep = targets >= 0
    assert loss.item() == pytest.approx(-logits[keep].gather(-1, targets[keep][:, None]).mean().item(), rel=1e-5)


def test_the_column_factor_conditions_on_the_next_tokens_row_only():
    """causal_outputs declares the column factor one token ahead (test_causality.py holds it to that): changing token
    t + 1 to another id of the same row leaves position t's factors alone; one of another row moves the columns."""
    model = build()
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    same_row, other_row = idx.clone(), idx.clone()
    row, col = int(model.token_row[idx[0, 6]]), int(model.token_col[idx[0, 6]])
    same_row[0, 6] = model.cell_token[row * 23 + (col + 1) % 22]
    other_row[0, 6] = model.cell_token[((row + 1) % 23) * 23 + col % 22]
    with torch.no_grad():
        outs = [model.causal_outputs(i) for i in (idx, same_row, other_row)]
    assert outs[0].keys() == {"logits", "row_logits", "col_logits_given_next_row"}
    assert outs[0]["col_logits_given_next_row"][1] == 1 and outs[0]["row_logits"][1] == 0
    cols = [o["col_logits_given_next_row"][0][0, 5] for o in outs]
    finite = cols[0].isfinite() & cols[2].isfinite()  # the rows' empty cells are -inf
    assert torch.equal(cols[0], cols[1]) and (cols[0] - cols[2])[finite].abs().max() > 1e-3
    assert torch.equal(outs[0]["row_logits"][0][0, 5], outs[2]["row_logits"][0][0, 5])


def test_the_placement_ranks_ids_by_their_count_in_the_train_shards_deterministically():
    """Counted over the first lightrnn_count_tokens of the train shards (the tiny preset's sample): the same table
    every time (every rank builds its own); the R most frequent ids fill column 0, one per row, the next R column 1
    (rows in reverse: snaking), so every row holds one id of each frequency tier; 0 tokens: id order."""
    args, _ = lightrnn.parse_args(["--preset=tiny", "--lightrnn_count_tokens=100000"])
    counts = lightrnn.token_counts(args.train_files, args.vocab_size, 100000)
    assert counts.sum() == 100000
    a, b = (lightrnn.GPT(lightrnn.GPTConfig.from_args(args)) for _ in range(2))
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("token_row", "token_col", "cell_token"))
    R = a.rows
    ranked = torch.as_tensor(np.argsort(-counts, kind="stable"))
    assert torch.equal(a.token_col[ranked[:R]], torch.zeros(R, dtype=torch.long))
    assert torch.equal(a.token_row[ranked[:R]], torch.arange(R))
    assert torch.equal(a.token_row[ranked[R:2 * R]], torch.arange(R).flip(0))
    assert counts[ranked[0]] > counts[ranked[R]] > 0  # real frequencies, not ties in id order
    by_id = lightrnn.GPT(lightrnn.GPTConfig.from_args(lightrnn.parse_args(["--preset=tiny",
                                                                           "--lightrnn_count_tokens=0"])[0]))
    assert torch.equal(by_id.token_row[:R], torch.arange(R)) and not torch.equal(by_id.token_row, a.token_row)
    assert "placed by token frequency" in a.describe() and "placed by id order" in by_id.describe()


def test_the_table_survives_a_checkpoint_a_resume_and_sample_py(shards, tmp_path):
    """The table is in the state dict: sample.py (which builds the model without data, so in id order) and a resume
    told to place by id order both get the trained frequency table back, and the resumed run writes it again."""
    flags = dict(num_iterations=4, val_every=0, save_every=4, lightrnn_rows=12)  # 12 x 22: 8 empty cells
    first = lightrnn.main(small_args(*shards, tmp_path / "a", **flags))
    ckpt = torch.load(first["last_checkpoint"], weights_only=False)
    trained = {n: ckpt["model"][n] for n in ("token_row", "token_col", "cell_token")}
    counts = lightrnn.token_counts(shards[0], 256, 10**7)
    assert torch.equal(trained["token_row"], torch.as_tensor(lightrnn.lightrnn_table(256, 12, counts)[0]))
    assert not torch.equal(trained["token_row"], torch.as_tensor(lightrnn.lightrnn_table(256, 12)[0]))
    loaded = sample.load_checkpoint(first["last_checkpoint"])[0]
    assert all(torch.equal(getattr(loaded, n), t) for n, t in trained.items())
    resumed = lightrnn.main(small_args(*shards, tmp_path / "a", resume=first["last_checkpoint"], num_iterations=6,
                                       val_every=0, save_every=6, lightrnn_count_tokens=0))
    again = torch.load(resumed["last_checkpoint"], weights_only=False)["model"]
    assert all(torch.equal(again[n], t) for n, t in trained.items())
    log = (tmp_path / "a" / f"{resumed['run_id']}.txt").read_text()
    assert "LightRNN: 256 ids in a 12 x 22 table (8 cells empty), placed by token frequency" in log


def test_sampling_only_emits_ids_of_used_cells():
    """The row head is pushed to the rows with an empty cell (6..22): every sampled and greedy token comes from those
    rows and maps back to its cell, and none from column 22, whose cells there are empty."""
    model = build()
    # +-30 before the logit transform: rows 0..5 end ~22 below the others, ~1e-9 of the mass
    model.lm_head.row.register_forward_hook(lambda m, i, out: out + torch.where(torch.arange(23) >= 6, 30.0, -30.0))
    idx = torch.randint(0, 512, (4, 3), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(0)
    emitted = [t for temperature in (1.0, 0.0) for row in sample.generate(
        model, idx, 24, temperature=temperature, top_k=None, generator=gen, stop_token=None) for t in row]
    assert len(emitted) == 2 * 4 * 24
    emitted = torch.tensor(emitted)
    rows, cols = model.token_row[emitted], model.token_col[emitted]
    assert torch.all(rows >= 6) and torch.all(cols < 22) and len(set(emitted.tolist())) > 20
    assert torch.equal(model.cell_token[rows * 23 + cols], emitted)


def test_124m_parameters_and_head_flops_against_the_full_softmax():
    """225 x 224 = 50400 cells for 50304 ids. Of the baseline's 539,100,320 parameters (tests/test_model.py), the two
    50304 x 768 tables (input embedding, head) become 449 x 768 (row and column vectors) and 225 + 224 head rows plus
    a 225 x 768 gate: 462,695,840 (-14.2%; the 5 value-embedding tables and the bigram table stay full). Training FLOPs
    per token (FlopCounterMode: matmuls, at the 1408-token causal row of the baseline's figure, 814,553,568) lose
    6 x 768 x (50304 - 449) of the head's: 584,821,728 (-28.2%); the gate is elementwise, the lookups are free."""
    args, _ = lightrnn.parse_args(["--attention=sdpa", "--seq_len=1408", "--lightrnn_count_tokens=0"])
    with torch.device("meta"):
        model = lightrnn.GPT(lightrnn.GPTConfig.from_args(args))
    d, table = 768, 50304 * 768
    head = d * (225 + 224)
    assert (model.rows, model.cols) == (225, 224)
    assert sum(p.numel() for p in model.parameters()) == 539_100_320 - 2 * table + (225 + 224) * d + head + 225 * d \
        == 462_695_840
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        idx = torch.zeros(1, 1408, dtype=torch.long)
        model(idx, idx).backward()
    assert counter.get_total_flops() / 1408 == 814_553_568 - 6 * (table - head) == 584_821_728
    assert 2 * head == 689_664 and 2 * 50304 * d == 77_266_944  # forward head FLOPs: 112x fewer


def test_the_records_head_init_on_both_factors_and_each_embedding_a_copy_of_its_head():
    """The baseline's lm_head N(0, 0.005) with wte a copy (2025-12-19 / 2025-12-22 records), factor by factor; the
    row gate starts at 1 (the column head reads h itself); the first loss is near ln(vocab_size)."""
    args, _ = lightrnn.parse_args(["--preset=tiny", "--vocab_size=50304", "--n_embd=256", "--n_head=2"])
    torch.manual_seed(0)
    model = lightrnn.GPT(lightrnn.GPTConfig.from_args(args))
    for head, table in ((model.lm_head.row, model.wte_row), (model.lm_head.col, model.wte_col)):
        assert head.weight.std().item() == pytest.approx(0.005, rel=0.03) and torch.equal(table.weight, head.weight)
    assert torch.equal(model.lm_head_col_gate, torch.ones(225, 256))
    idx = torch.randint(0, 50304, (2, 64))
    with torch.no_grad():
        assert model(idx, torch.randint(0, 50304, (2, 64))).item() == pytest.approx(math.log(50304), abs=0.05)


def test_kv_cache_decoding_equals_the_full_forward_at_the_records_11_layers():
    """Key offset, smear (of row + column vectors, across a cache boundary: cache["last"]) and the bigram hash in
    play; windows shorter than the sequence; documents at positions 0 and 1."""
    model = random_model(lightrnn, *DEEP, "--vocab_size=50304")
    model.windows.copy_(torch.tensor([6, 3]))
    idx = torch.randint(0, 50000, (2, 20), generator=torch.Generator().manual_seed(4))
    idx[0, 0] = idx[0, 9] = idx[1, 1] = idx[1, 15] = 50256
    with torch.no_grad():
        full = model(idx)
        parts, cache = [], None
        for a, b in ((0, 1), (1, 7), (7, 12)) + tuple((t, t + 1) for t in range(12, 20)):
            logits, cache = model.forward_cached(idx[:, a:b], cache)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
def test_documents_stay_apart_at_the_records_11_layers(grad):
    """Every output, the column factor included: smear and the bigram hash never look back across an EOT."""
    model = random_model(lightrnn, *DEEP)
    assert all(moved == 0.0 for moved in document_leaks(model, grad).values())


def test_the_deep_model_is_causal():
    assert find_leaks(random_model(lightrnn, *DEEP, "--vocab_size=512")) == []


@pytest.mark.parametrize("flag, message", [
    ("--lightrnn_rows=-1", r"error: --lightrnn_rows=-1: expected an integer in \[0, --vocab_size=512\]"),
    ("--lightrnn_rows=513", r"error: --lightrnn_rows=513: expected an integer in \[0, --vocab_size=512\]"),
    ("--lightrnn_count_tokens=-5", r"error: --lightrnn_count_tokens=-5: expected an integer >= 0"),
])
def test_bad_lightrnn_flags_are_clear_errors(flag, message):
    with pytest.raises(SystemExit, match=message):  # IdeaFlags.check(), when the flags are parsed
        lightrnn.parse_args(["--preset=tiny", "--vocab_size=512", flag])
