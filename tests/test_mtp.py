"""Multi-Token Prediction (train_gpt2_mtp.py): what the idea promises, as tests, in both --mtp_mode values.

modules, DeepSeek-V3 sequential MTP (section 2.2): depth d at index i joins depth d-1's state at position i
with the trunk's embedding of token i + d (x0 and the bigram embedding), so it sees tokens <= i + d, and
predicts token i + d + 1 through the shared head. On the packed streams its block (one more last layer: the
long window and the key offset, no value-embedding table) attends as position i does: within position i's
document and the trunk's windows. Training loss = next-token loss + w * mean(MTP losses) with a scheduled w;
the MTP modules can be dropped for inference.

param_free, the 2025-12-22 record's: the logits at t also score token t + 1 + d at weight w_d ([1, 0.5,
0.25->0] -> [1, 0.5->0] -> [1] by thirds at depth 2), never a token of a later document; every term is summed
over its positions and divided by the next-token targets' count, as the record's sum of them all.

In both, validation is the next-token loss alone. The generic tests (test_causality.py,
tests/test_attention.py, tests/test_model.py, tests/test_train.py, ...) cover the script's default mode too;
these check the MTP specifics, and both modes at the record's 11 layers.
"""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from test_causality import find_leaks
from tests.helpers import (ROOT, assert_reordering_only, decode_in_pieces, load_script, random_model,
                           read_log, small_args, tokens, ulp_nudged)
from tests.test_attention import document_leaks
from tests.test_compile import loss_and_gradients
from tests.test_v3 import DEEP

mtp = load_script(ROOT / "train_gpt2_mtp.py")
VOCAB, T, EOT = 512, 24, 50256
PARAM_FREE = ["--mtp_mode=param_free", "--mtp_depth=2"]  # the record's


def build(depth=2, randomise=True, vocab=VOCAB, **flags):
    """A tiny fp32 model on T-token streams with a small bigram table; random weights by default
    (zero-initialised projections hide bugs)."""
    argv = [f"--vocab_size={vocab}", f"--device_batch_tokens={T}", f"--mtp_depth={depth}",
            "--bigram_vocab=1000", *(f"--{k}={v}" for k, v in flags.items())]
    if randomise:
        return random_model(mtp, *argv)
    torch.manual_seed(0)
    return mtp.GPT(mtp.GPTConfig.from_args(mtp.parse_args(["--preset=tiny", *argv])[0]))


def documents(batch=2):
    """Streams of the full vocabulary with documents starting mid-stream (each at its EOT)."""
    torch.manual_seed(5)
    idx = torch.randint(0, 50000, (batch, T))
    idx[0, [0, 9, 17]] = EOT
    idx[1, [5]] = EOT
    return idx


def reference_mtp_logits(model, idx):
    """Depth d written out from the paper on the T - d indices that have a target, independently of the
    model's full-length padding: index i joins depth d-1's state at i with the trunk's embedding of token i +
    d (x0 and bigram at i + d), and its block (no value embedding) attends with the masks of positions 0 ..
    T-d-1, (T-d)-long."""
    masks, _ = model.masks(idx)
    x0, bigram = model.embed(idx, model.has_prev(idx))
    h, out = model.hidden(idx, masks), []
    for d, module in enumerate(model.mtp, 1):
        n = idx.size(1) - d
        emb = x0[:, d:]
        x = module.proj(torch.cat((h[:, :n], emb), -1))
        mask = model.masks(idx[:, :n])[0][module.block.long_window]
        h = mtp.norm(module.block(x, emb, bigram[:, d:], None, mask, model.freqs, model.attn_scale,
                                  model.has_prev(idx[:, :n])))
        out.append(model.logits(h))
    return out


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
def test_causal_outputs_list_every_depth_as_the_paper_defines_it(grad):
    """With documents and windows shorter than the stream (long 6, short 3 tokens), on FlexAttention's path
    and the dense one: every depth equals the (T - d)-long reference, so each depth uses the trunk's document
    masks and windows, shifted to its indices."""
    model = build(depth=3, vocab=50304).eval()
    model.windows.copy_(torch.tensor([6, 3]))  # the windows schedule() sets (a buffer)
    idx = documents()
    with torch.set_grad_enabled(grad):
        outputs = model.causal_outputs(idx)
        reference = reference_mtp_logits(model, idx)
        main = model(idx)
    assert list(outputs) == ["logits", "mtp1_logits", "mtp2_logits", "mtp3_logits"]
    assert outputs["logits"][1] == 0 and torch.equal(outputs["logits"][0], main)
    for d in (1, 2, 3):
        logits, lookahead = outputs[f"mtp{d}_logits"]
        assert lookahead == d and logits.shape == (2, T - d, 50304)
        torch.testing.assert_close(logits, reference[d - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_depth_d_at_i_uses_token_i_plus_d_and_nothing_later(depth):
    model = build(depth=depth).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, T))
    name = f"mtp{depth}_logits"
    with torch.no_grad():
        base = model.causal_outputs(idx)
        for i in (0, 5, T - depth - 1):  # the first, a middle and the last index that has an output
            changed = idx.clone()
            changed[:, i + depth] = (idx[:, i + depth] + 1) % VOCAB  # token i + d: depth d at i must use it
            moved = model.causal_outputs(changed)
            assert not torch.allclose(moved[name][0][:, i], base[name][0][:, i]), f"{name}: token i+d at {i}"
            assert torch.equal(moved[name][0][:, :i], base[name][0][:, :i])  # earlier indices never see it
            later = idx.clone()
            later[:, i + depth + 1:] = (idx[:, i + depth + 1:] + 7) % VOCAB  # every token after i + d
            moved = model.causal_outputs(later)
            for d in range(1, depth + 1):  # depth d' <= depth at index <= i sees tokens <= i + d' only
                out = f"mtp{d}_logits"
                assert torch.equal(moved[out][0][:, :i + 1], base[out][0][:, :i + 1])
            # the main head at i depends on tokens <= i only, and does use token i
            after_i = idx.clone()
            after_i[:, i + 1:] = (idx[:, i + 1:] + 3) % VOCAB
            moved = model.causal_outputs(after_i)
            assert torch.equal(moved["logits"][0][:, :i + 1], base["logits"][0][:, :i + 1])
            at_i = idx.clone()
            at_i[:, i] = (idx[:, i] + 1) % VOCAB
            assert not torch.allclose(model.causal_outputs(at_i)["logits"][0][:, i], base["logits"][0][:, i])


def test_the_generic_causality_check_covers_every_depth_and_catches_an_mtp_leak():
    model = build(depth=2).eval()
    assert find_leaks(model) == []
    honest = model.mtp_hidden
    # a one-token-too-far input: depth d at i gets token i + d + 1, the very token it predicts
    model.mtp_hidden = lambda idx, x, embedded, masks: honest(idx, x, [e.roll(-1, 1) for e in embedded],
                                                              masks)
    leaks = find_leaks(model)
    for d in (1, 2):
        assert any(s.startswith(f"mtp{d}_logits: changing tokens") for s in leaks), leaks
        assert any(s.startswith(f"mtp{d}_logits: position") and "gradient" in s for s in leaks), leaks
    assert not any(s.startswith("logits:") for s in leaks)  # the main head is untouched by the leak


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
def test_every_depth_keeps_documents_apart_and_a_depth_without_masks_is_caught(grad):
    """Change every token of the first documents (before the EOT at 9 in row 0, at 5 in row 1): no output of
    any depth at a later document's index moves (index i belongs to position i's document; the key offset,
    smear and bigram of the block never look back across one). The same check catches MTP blocks that attend
    causally across documents, as a block given no masks would."""
    model = build(depth=2, vocab=50304).eval()
    idx = documents()
    changed = idx.clone()
    changed[0, 1:9] = (idx[0, 1:9] + 7) % 50000
    changed[1, :5] = (idx[1, :5] + 7) % 50000

    def moved():
        with torch.set_grad_enabled(grad):
            a, b = model.causal_outputs(idx), model.causal_outputs(changed)
        return {name: max((a[name][0][0, 9:] - b[name][0][0, 9:]).abs().max().item(),
                          (a[name][0][1, 5:] - b[name][0][1, 5:]).abs().max().item()) for name in a}
    assert moved() == {"logits": 0.0, "mtp1_logits": 0.0, "mtp2_logits": 0.0}
    honest = model.mtp_hidden
    model.mtp_hidden = lambda idx, x, embedded, masks: honest(idx, x, embedded, {True: None, False: None})
    leaky = moved()
    assert leaky["logits"] == 0.0 and leaky["mtp1_logits"] > 1e-3 and leaky["mtp2_logits"] > 1e-3


@pytest.mark.parametrize("flags", [["--mtp_depth=2"], PARAM_FREE], ids=["modules", "param_free"])
def test_the_records_11_layers_are_causal_document_isolated_and_decode_with_the_cache(flags):
    """At the record's layout (tests/test_v3.py's DEEP: no attention in layer 6, skip, backout, XSA), in each
    mode: every output is causal, no output of a later document moves with an earlier one, and KV-cache
    decoding (the trunk's: MTP adds nothing to the cache) equals the full forward."""
    model = random_model(mtp, *DEEP, "--vocab_size=50304", *flags)
    assert find_leaks(model) == []
    assert all(moved == 0.0 for moved in document_leaks(model, grad=False).values())
    model.windows.copy_(torch.tensor([6, 3]))
    idx = documents()[:, :20]
    with torch.no_grad():
        decoded, _ = decode_in_pieces(model, idx, [1, 6, 5] + [1] * 8)
        torch.testing.assert_close(decoded, model(idx), atol=1e-4, rtol=1e-4)


def test_training_loss_is_next_token_loss_plus_weighted_mean_of_mtp_losses():
    """modules: every depth-d target in the stream counts, across document boundaries too (as in v2): where a
    document ends within d tokens, depth d predicts the next one's first tokens, as the next-token loss
    predicts its EOT."""
    model = build(depth=2, vocab=50304, mtp_weight=0.7, mtp_weight_schedule="constant").train()
    seq = torch.cat((documents(3), torch.randint(0, 50000, (3, 1))), dim=1)
    idx, targets = seq[:, :-1], seq[:, 1:]
    loss = model(idx, targets)
    with torch.no_grad():
        main = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        # depth d at index i predicts token i + d + 1 of the sequence: seq[:, d + 1:]
        aux = [F.cross_entropy(logits.flatten(0, 1), seq[:, d + 1:].flatten())
               for d, logits in enumerate(reference_mtp_logits(model, idx), 1)]
    torch.testing.assert_close(loss.detach(), main + 0.7 * (aux[0] + aux[1]) / 2, rtol=1e-5, atol=1e-5)
    assert aux[0] != aux[1]  # two genuinely different terms, so a wrong mean or weight would show
    # activation checkpointing recomputes the MTP blocks too: same loss, same gradients
    loss.backward()
    ckpt = build(depth=2, vocab=50304, mtp_weight=0.7, mtp_weight_schedule="constant",
                 activation_checkpointing=1)
    ckpt.load_state_dict(model.state_dict())
    loss_ckpt = ckpt.train()(idx, targets)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert not name.startswith("mtp.") or p.grad.abs().max() > 0, name  # every MTP weight learns


def direct_param_free_loss(logits, seq, weights):
    """The record's loss written out term by term: position t scores token t + 1 + d (seq[:, t + 1 + d]) with
    weight (1, *weights)[d], skipping a token past the stream, an ignored one (-1), and for d >= 1 one in a
    later document than token t + 1 (an EOT among tokens t + 1 .. t + 1 + d); the sum over every term, divided
    by the number of next-token targets."""
    B, n = logits.shape[:2]
    total, count = 0.0, 0
    for b in range(B):
        for t in range(n):
            count += int(seq[b, t + 1] >= 0)
            for d, w in enumerate([1.0, *weights]):
                j = t + 1 + d
                if j > n or seq[b, j] < 0 or (d and (seq[b, t + 1:j + 1] == EOT).any()):
                    continue
                total += w * F.cross_entropy(logits[b, t], seq[b, j])
    return total / count


def test_param_free_loss_is_the_records_term_by_term_within_documents():
    """At progress 0.1 (weights 0.5 and 0.175), with documents mid-stream and an ignored target: the training
    loss equals the direct computation; it has no parameters of its own, and validation is the next-token
    loss."""
    model = build(depth=2, vocab=50304, mtp_mode="param_free").train()
    assert len(model.mtp) == 0 and sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in build(depth=0, vocab=50304).parameters())
    model.schedule(0.1)
    assert model.mtp_weights.tolist() == pytest.approx([0.5, 0.175])
    seq = torch.cat((documents(), torch.randint(0, 50000, (2, 1))), dim=1)
    seq[0, 4] = -1  # an ignored token: no term scores it, and it is not counted
    idx, targets = seq[:, :-1].clamp_min(0), seq[:, 1:]
    with torch.no_grad():
        loss = model(idx, targets)
        direct = direct_param_free_loss(model(idx), seq, [0.5, 0.175])
        next_token = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-5)
    assert loss > next_token * 1.2  # the extra terms count
    torch.testing.assert_close(model.eval()(idx, targets), next_token)


def test_param_free_never_scores_a_token_of_a_later_document():
    """Change every token of the later documents but their EOTs: no term at an earlier document's positions
    moves, though some of them reach past its end (row 0's document 1..8 ends at the EOT at 9: terms t + 1 + d
    >= 10). The record's rule, every token within the stream, would score them: its terms move."""
    model = build(depth=2, vocab=50304, mtp_mode="param_free").train()
    idx = documents()
    seq = torch.cat((idx, torch.randint(0, 50000, (2, 1))), dim=1)
    changed = seq.clone()
    changed[0, 10:17], changed[0, 18:] = (seq[0, 10:17] + 7) % 50000, (seq[0, 18:] + 7) % 50000
    changed[1, 6:] = (seq[1, 6:] + 7) % 50000
    with torch.no_grad():
        ours = [model.token_losses(model(s[:, :-1]), s[:, 1:], 2) for s in (seq, changed)]
        record = [model.token_losses(model(s[:, :-1]), s[:, 1:].masked_fill(s[:, 1:] == EOT, 0), 2)
                  for s in (seq, changed)]  # no EOT in the targets: nothing is masked but the stream's end
    for a, b in (ours, record):
        assert torch.equal(a[0, :9, 0], b[0, :9, 0]) and torch.equal(a[1, :5, 0], b[1, :5, 0])  # next tokens
    earlier = (slice(0, 1), slice(0, 9)), (slice(1, 2), slice(0, 5))  # row 0's first 2 documents, row 1's 1st
    assert all(torch.equal(ours[0][r, t], ours[1][r, t]) for r, t in earlier)
    assert all((record[0][r, t] - record[1][r, t]).abs().max() > 1e-3 for r, t in earlier)
    # row 0, t = 6: token 8 is its document's, token 9 (an EOT) the next one's; t = 7, 8: only the next token
    assert (ours[0][0, 6:9, 1:] > 0).tolist() == [[True, False], [False, False], [False, False]]


@pytest.mark.parametrize("t", [0, 5, T - 4])
def test_param_free_depth_d_at_t_reads_tokens_up_to_t_and_its_target_only(t):
    """Causality per depth: the term of depth d at position t depends on tokens <= t (the logits) and token t
    + 1 + d (its target), nothing else: changing any other later token leaves it, changing its target moves
    it."""
    model = build(depth=2, mtp_mode="param_free").eval()
    torch.manual_seed(1)
    seq = torch.randint(0, VOCAB, (2, T + 1))

    def terms(s):
        with torch.no_grad():
            return model.token_losses(model(s[:, :-1]), s[:, 1:], 2)[:, t]
    base = terms(seq)
    for d in range(3):
        others = seq.clone()
        others[:, t + 1:] = (seq[:, t + 1:] + 5) % VOCAB
        others[:, t + 1 + d] = seq[:, t + 1 + d]
        assert torch.equal(terms(others)[:, d], base[:, d])
        target = seq.clone()
        target[:, t + 1 + d] = (seq[:, t + 1 + d] + 5) % VOCAB
        assert (terms(target)[:, d] - base[:, d]).abs().min() > 1e-4


@pytest.mark.parametrize("mode", ["modules", "param_free"])
def test_validation_loss_excludes_the_aux_loss(mode):
    """Same weights, different MTP weights: the eval-mode loss (what evaluate() reports) never changes and
    equals the loss of the model without MTP; the training-mode loss does change."""
    model = build(depth=2, mtp_weight_schedule="constant", mtp_mode=mode)
    no_mtp = build(depth=0)
    no_mtp.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    idx, targets = torch.randint(0, VOCAB, (2, T)), torch.randint(0, VOCAB, (2, T))
    evals, trains = [], []
    with torch.no_grad():
        for w in (0.0, 0.3, 5.0):
            model.mtp_weights.fill_(w)
            evals.append(model.eval()(idx, targets))
            trains.append(model.train()(idx, targets))
        reference, train_reference = no_mtp.eval()(idx, targets), no_mtp.train()(idx, targets)
    assert all(torch.equal(e, reference) for e in evals)
    torch.testing.assert_close(trains[0], train_reference, rtol=1e-6, atol=0)  # param_free: its own sum
    assert trains[0] < trains[1] < trains[2]


@pytest.mark.parametrize("flags, expected", [
    (dict(mtp_weight=4, mtp_weight_schedule="constant"), 5),
    (dict(mtp_mode="param_free", mtp_depth=2), 1 + 0.5 * 255 / 256 + 0.25 * 254 / 256),
], ids=["modules", "param_free"])
def test_the_training_loop_logs_val_loss_without_and_train_loss_with_the_aux_loss(flags, expected, shards,
                                                                                   tmp_path):
    """At initialisation every head is near uniform (the head N(0, 0.005): each loss is ln 256 within ~0.007),
    so the logged train loss of step 1 is the sum of the weights times ln 256 and the validation loss stays
    ln 256. modules: 1 + w = 5. param_free: 1 + 0.5 * 255/256 + 0.25 * 254/256 on 256-token streams, each
    depth's sum divided by all 256 positions as the record's (over its own 256 - d valid positions it would be
    1.75: a loss 0.022 higher, twice the tolerance). The start-up line says what the idea costs."""
    summary = mtp.main(small_args(*shards, tmp_path, num_iterations=1, val_every=1, **flags))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert train[1] == pytest.approx(expected * math.log(256), abs=0.006 * expected)
    assert val[0] == pytest.approx(math.log(256), abs=0.01)
    start = "\n# MTP: depth 1 adds " if "mtp_weight" in flags else "\n# MTP (param_free): the logits at t"
    assert start in (tmp_path / f"{summary['run_id']}.txt").read_text()


def record_schedule(x):
    """_build_mtp_schedule of the 2025-12-22 record (as at 2026-01-26), x = step / scheduled steps: the
    weights of the next token and of t+2, t+3."""
    if x < 1 / 3:
        return [1.0, 0.5, 0.25 * (1 - 3 * x)]
    if x < 2 / 3:
        return [1.0, 0.5 * (1 - (3 * x - 1))]
    return [1.0]


@pytest.mark.parametrize("schedule, zero_at, expected", [
    ("constant", 1.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 1.0, [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", 1.0, [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0]),
    ("linear", 0.5, [1.0, 0.5, 0.0, 0.0, 0.0]),
    ("cosine", 0.5, [1.0, 0.5, 0.0, 0.0, 0.0]),
])
@pytest.mark.parametrize("depth", [1, 2])
def test_modules_schedule_sets_the_weight_buffer_and_the_windows_in_place(schedule, zero_at, expected, depth):
    """modules: each depth's weight is mtp_weight / depth (the mean) times the schedule's factor."""
    model = build(depth=depth, randomise=False, mtp_weight=0.4, mtp_weight_schedule=schedule,
                  mtp_weight_zero_at=zero_at, window_blocks="1,2,3,4")
    buffer, windows = model.mtp_weights, model.windows
    assert buffer.shape == (depth,) and "mtp_weights" in dict(model.named_buffers())
    assert buffer.tolist() == pytest.approx([0.4 / depth] * depth)  # before the first schedule(): the start's
    seen, long_windows = [], []
    for progress in (0.0, 0.25, 0.5, 0.75, 1.0):
        model.schedule(progress)
        assert model.mtp_weights is buffer and model.windows is windows  # in place: compile sees the same
        seen.append(buffer.tolist())
        long_windows.append(windows[0].item())
    assert seen == [pytest.approx([0.4 * e / depth] * depth, abs=1e-7) for e in expected]
    assert long_windows == [128, 256, 384, 512, 2560]  # the baseline's schedule still runs (1: the final)
    assert "mtp_weights" not in model.state_dict()  # schedule() sets it before every step: nothing to restore


def test_param_free_schedule_is_the_records():
    """Depth 2 follows the record's _build_mtp_schedule at every 1/120 of the run (its stage ends included)
    and at the progress values below; depth 1 fades its 0.5 over the first half (D + 1 = 2 stages), depth 3
    over quarters."""
    model = build(depth=2, randomise=False, mtp_mode="param_free")
    buffer = model.mtp_weights
    for step in range(121):
        model.schedule(step / 120)
        assert model.mtp_weights is buffer
        expected = (record_schedule(step / 120)[1:] + [0.0, 0.0])[:2]
        assert buffer.tolist() == pytest.approx(expected, abs=1e-6), step
    for progress, expected in ((0, [0.5, 0.25]), (1 / 6, [0.5, 0.125]), (0.5, [0.25, 0]), (0.7, [0, 0])):
        model.schedule(progress)
        assert buffer.tolist() == pytest.approx(expected, abs=1e-6)
    config = build(depth=3, randomise=False, mtp_mode="param_free").config
    assert mtp.mtp_weights(config, 0.125) == [0.5, 0.25, 0.0625]
    assert mtp.mtp_weights(dataclasses.replace(config, mtp_depth=1), 0.25) == [0.25]


@pytest.mark.parametrize("flags", [["--mtp_weight_schedule=step"], ["--mtp_weight_zero_at=0"],
                                   ["--mtp_depth=-1"], ["--mtp_depth=24"],
                                   ["--attention=sdpa", "--seq_len=8", "--mtp_depth=8"],
                                   ["--mtp_mode=param_free", "--mtp_depth=24"]])
def test_bad_mtp_flags_are_errors(flags):
    """A flag's own range when the flags are parsed; a depth the stream cannot hold when the model's config
    is."""
    with pytest.raises(SystemExit, match="error: --mtp_"):
        args, _ = mtp.parse_args(["--preset=tiny", "--device_batch_tokens=24", *flags])  # 24-token streams
        mtp.GPTConfig.from_args(args)


def test_an_unknown_mode_is_a_one_line_error_naming_the_modes():
    with pytest.raises(SystemExit) as error:
        mtp.parse_args(["--mtp_mode=bogus"])
    assert str(error.value) == "error: --mtp_mode=bogus: expected modules or param_free"


def flops_of_a_training_step(*flags):
    """torch's FLOP counter over one training step on a 1408-token causal row (the last stage's long window),
    and the model: every Linear, SDPA and the head, per token."""
    args, _ = mtp.parse_args(["--attention=sdpa", "--seq_len=1408", *flags])
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        model = mtp.GPT(mtp.GPTConfig.from_args(args))
        idx = torch.zeros(1, 1408, dtype=torch.long)
        model(idx, idx).backward()
    return counter.get_total_flops() / 1408, model


def test_124m_parameters_and_flops_per_token():
    """At 124M the MTP module of depth 1 adds 8,257,613 parameters (+1.5% over the baseline's 539,100,320):
    its projection M (2C x C), one block's attention q, k, v, out (4 C^2) and MLP (8 C^2), its attention gate
    (12 inputs x 6 heads) and 5 scalars (the v and output lambdas, the resid, x0 and bigram lambdas).
    param_free adds none. Training FLOPs per token, 6 per weight that multiplies (Kaplan et al. 2020) plus 12
    * width * keys per attention layer over a causal row of the last stage's long window (1408 keys), as
    tests/test_model.py counts the baseline: the main model 814,553,568 = 6 x 114,132,048 weights (10
    attention layers x (4 C^2 + 72 gate weights), 5 value-embedding gates x 72, 11 MLPs x 8 C^2, the head
    50304 x 768, the smear and skip gates' 12 each) + 10 attention layers x 12 x 768 x 1408; depth 1 adds
    294,322,608 (+36.1%): 6 x its 8,257,608 weights, one attention layer and the head again (6 x 38.6M: most
    of it). param_free adds no matmul (its extra terms are a gather of the same logits). torch's FLOP counter
    measures both, at depth 2 for modules: the MTP blocks and the head run on every position (the last d
    positions of depth d have no target: their loss is ignored, so every depth's head loss has the trunk's
    shapes and one compiled graph serves them all)."""
    with torch.device("meta"):  # the 124M preset
        model, param_free = (mtp.GPT(mtp.GPTConfig.from_args(mtp.parse_args(f)[0])) for f in ([], PARAM_FREE))
    C, V = 768, 50304
    assert sum(p.numel() for p in model.mtp.parameters()) == 2 * C * C + 12 * C * C + 72 + 5 == 8_257_613
    baseline = sum(p.numel() for p in param_free.parameters())
    assert baseline == 539_100_320 and sum(p.numel() for p in model.parameters()) == baseline + 8_257_613
    assert model.describe().startswith("MTP: depth 1 adds 0.294 GFLOPs per token (+36.1% ")
    main, extra = mtp.training_flops_per_token(model)
    attention = 12 * C * 1408
    weights = 10 * (4 * C * C + 72) + 5 * 72 + 11 * 8 * C * C + V * C + 12 + 12
    assert weights == 114_132_048 and main == 6 * weights + 10 * attention == 814_553_568
    assert extra == 6 * (14 * C * C + 72 + V * C) + attention == 294_322_608
    assert mtp.training_flops_per_token(param_free) == (main, 0)
    measured, model = flops_of_a_training_step("--mtp_depth=2")
    assert measured == sum(mtp.training_flops_per_token(model)) == main + 2 * extra
    measured, model = flops_of_a_training_step(*PARAM_FREE)
    assert measured == main


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_trains_and_its_checkpoint_serves_inference_without_the_mtp_modules(depth, shards, tmp_path):
    summary = mtp.main(small_args(*shards, tmp_path, num_iterations=24, val_every=12, save_every=24,
                                  mtp_depth=depth))
    _, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert val[24] < val[0] - 1.0, val
    ckpt = torch.load(summary["last_checkpoint"], weights_only=False)
    # sample.py's path: the checkpoint's own config, the full model, strict loading, then decoding
    full = mtp.GPT(mtp.GPTConfig(**ckpt["model_config"])).eval()
    full.load_state_dict(ckpt["model"])
    assert len(full.mtp) == depth
    dropped = mtp.GPT(mtp.GPTConfig(**{**ckpt["model_config"], "mtp_depth": 0})).eval()
    dropped.load_state_dict(ckpt["model"])  # the mtp.* weights are left out; everything else must match
    assert not any(k.startswith("mtp.") for k in dropped.state_dict())
    baseline = load_script(ROOT / "train_gpt2.py")
    n_baseline = sum(p.numel() for p in baseline.GPT(baseline.GPTConfig.from_args(baseline.parse_args(
        small_args(*shards, tmp_path))[0])).parameters())
    assert sum(p.numel() for p in dropped.parameters()) == n_baseline
    torch.manual_seed(4)
    seq = torch.randint(0, 256, (2, 33))
    idx = seq[:, :-1]
    with torch.no_grad():
        logits = full(idx)
        assert torch.equal(dropped(idx), logits)
        assert torch.equal(dropped.forward_cached(idx)[0], full.forward_cached(idx)[0])
        torch.testing.assert_close(full.forward_cached(idx)[0], logits, rtol=1e-5, atol=1e-5)
        # the MTP modules learned too: depth d predicts token i+d+1 of the Markov data far better than chance
        windows = torch.from_numpy(mtp.load_val_tokens(shards[1], 2048)[:4 * 33]).view(4, 33)  # val data
        for d, logits_d in enumerate(reference_mtp_logits(full, windows[:, :-1]), 1):
            aux = F.cross_entropy(logits_d.flatten(0, 1), windows[:, d + 1:].flatten())
            assert aux < math.log(256) - 1.0, (d, aux)
    incomplete = {k: v for k, v in ckpt["model"].items() if k != "lm_head.weight"}
    with pytest.raises(RuntimeError, match="lm_head.weight"):  # dropping MTP does not loosen strict loading
        dropped.load_state_dict(incomplete)


def test_param_free_trains_and_its_checkpoint_is_the_baselines_shape(shards, tmp_path):
    summary = mtp.main(small_args(*shards, tmp_path, num_iterations=24, val_every=12, save_every=24, **dict(
        f[2:].split("=") for f in PARAM_FREE)))
    _, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert val[24] < val[0] - 1.0, val
    ckpt = torch.load(summary["last_checkpoint"], weights_only=False)
    baseline = load_script(ROOT / "train_gpt2.py")
    model = baseline.GPT(baseline.GPTConfig.from_args(baseline.parse_args(small_args(*shards, tmp_path))[0]))
    model.load_state_dict(ckpt["model"])  # strict: the same weights as the baseline's, nothing more


def test_param_free_compiles_to_what_eager_computes():
    """The param_free loss is in the compiled head loss: one training forward and backward, compiled vs eager
    vs float64, as tests/test_compile.py checks the default mode."""
    model = random_model(mtp, "--vocab_size=50304", "--n_layer=4", "--value_embeds=1", "--bigram_vocab=1000",
                         *PARAM_FREE).train()
    model.schedule(0.2)  # weights 0.5 and 0.1
    seq = tokens(1, 257, eots=(0, 70, 71, 190))  # documents, one of them a lone EOT
    reference, compiled = copy.deepcopy(model).double(), copy.deepcopy(model)
    compiled.compile_regions()
    (loss_c, grads_c), (loss_r, grads_r) = (loss_and_gradients(m, seq[:, :-1], seq[:, 1:])
                                            for m in (compiled, reference))
    eager = [loss_and_gradients(m, seq[:, :-1], seq[:, 1:])
             for m in (model, ulp_nudged(model, 1), ulp_nudged(model, 2))]  # the yardstick: tests/helpers.py
    assert_reordering_only(loss_c, [loss for loss, _ in eager], loss_r, "training loss")
    for name in grads_c:
        assert_reordering_only(grads_c[name], [grads[name] for _, grads in eager], grads_r[name], f"gradient of {name}")


def test_with_mtp_weight_zero_the_script_trains_exactly_like_the_baseline(shards, tmp_path):
    """Nothing but MTP differs: with weight 0 the aux loss contributes no gradient to the shared weights, the
    MTP modules are built after the main model (same initial weights), so the curves match the baseline's."""
    args = dict(num_iterations=6, val_every=3)
    base = load_script(ROOT / "train_gpt2.py").main(small_args(*shards, tmp_path / "a", **args))
    zero = mtp.main(small_args(*shards, tmp_path / "b", mtp_weight=0, **args))
    train_a, val_a, _ = read_log(tmp_path / "a" / f"{base['run_id']}.txt")
    train_b, val_b, _ = read_log(tmp_path / "b" / f"{zero['run_id']}.txt")
    assert sorted(train_b) == sorted(train_a) and sorted(val_b) == sorted(val_a) == [0, 3, 6]
    for step in train_a:
        assert train_b[step] == pytest.approx(train_a[step], abs=2e-4)  # logged to 4 decimals
    for step in val_a:
        assert val_b[step] == pytest.approx(val_a[step], abs=2e-4)
