"""Multi-Token Prediction (train_gpt2_mtp.py): what the idea promises, as tests.

DeepSeek-V3 sequential MTP (section 2.2): depth d at index i joins depth d-1's state at position i with the embedding
of token i + d, so it sees tokens <= i + d, and predicts token i + d + 1 through the shared head. On v2's packed
streams its block attends as position i does: within position i's document and the trunk's windows. Training loss =
next-token loss + w * mean(MTP losses) with a scheduled w; validation is the next-token loss alone; the MTP modules
can be dropped for inference. The generic tests (test_causality.py, tests/test_attention.py, tests/test_model.py,
tests/test_train.py, ...) cover the script too; these check the MTP specifics.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from test_causality import find_leaks
from tests.helpers import ROOT, load_script, read_log, small_args

mtp = load_script(ROOT / "train_gpt2_mtp.py")
VOCAB, T, EOT = 512, 24, 50256


def build(depth=2, randomise=True, vocab=VOCAB, **flags):
    """A tiny fp32 model on T-token streams; random weights by default (zero-initialised projections hide bugs)."""
    argv = ["--preset=tiny", f"--vocab_size={vocab}", f"--device_batch_tokens={T}", f"--mtp_depth={depth}"]
    args, _ = mtp.parse_args(argv + [f"--{k}={v}" for k, v in flags.items()])
    torch.manual_seed(0)
    model = mtp.GPT(mtp.GPTConfig.from_args(args)).float()
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def documents(batch=2):
    """Streams of the full vocabulary with documents starting mid-stream (each at its EOT)."""
    torch.manual_seed(5)
    idx = torch.randint(0, 50000, (batch, T))
    idx[0, [0, 9, 17]] = EOT
    idx[1, [5]] = EOT
    return idx


def reference_mtp_logits(model, idx):
    """Depth d written out from the paper on the T - d indices that have a target, independently of the model's
    full-length padding: index i joins depth d-1's state at i with the embedding of token i + d (idx[:, d:]), and its
    block (x0: that embedding; no value embedding) attends with the masks of positions 0 .. T-d-1, (T-d)-long."""
    masks, _ = model.masks(idx)
    h, out = model.hidden(idx, masks), []
    for d, module in enumerate(model.mtp, 1):
        n = idx.size(1) - d
        emb = mtp.norm(model.wte(idx[:, d:]))
        x = module.proj(torch.cat((h[:, :n], emb), -1))
        h = mtp.norm(module.block(x, emb, None, model.masks(idx[:, :n])[0][module.block.long_window]))
        out.append(model.logits(h))
    return out


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
def test_causal_outputs_list_every_depth_as_the_paper_defines_it(grad):
    """With documents and windows shorter than the stream (long 6, short 3 tokens), on FlexAttention's path and the
    dense one: every depth equals the (T - d)-long reference, so each depth uses the trunk's document masks and
    windows, shifted to its indices."""
    model = build(depth=3, vocab=50304).eval()
    model.final_windows.copy_(torch.tensor([6, 3]))  # evaluation's windows (a buffer)
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
            assert not torch.allclose(moved[name][0][:, i], base[name][0][:, i]), f"{name} ignores token i+d at {i}"
            assert torch.equal(moved[name][0][:, :i], base[name][0][:, :i])  # earlier indices never see it
            later = idx.clone()
            later[:, i + depth + 1:] = (idx[:, i + depth + 1:] + 7) % VOCAB  # every token after i + d
            moved = model.causal_outputs(later)
            for d in range(1, depth + 1):  # depth d' <= depth at index <= i sees tokens <= i + d' only
                assert torch.equal(moved[f"mtp{d}_logits"][0][:, :i + 1], base[f"mtp{d}_logits"][0][:, :i + 1])
            # the main head at i depends on tokens <= i only, and does use token i
            after_i = idx.clone()
            after_i[:, i + 1:] = (idx[:, i + 1:] + 3) % VOCAB
            assert torch.equal(model.causal_outputs(after_i)["logits"][0][:, :i + 1], base["logits"][0][:, :i + 1])
            at_i = idx.clone()
            at_i[:, i] = (idx[:, i] + 1) % VOCAB
            assert not torch.allclose(model.causal_outputs(at_i)["logits"][0][:, i], base["logits"][0][:, i])


def test_the_generic_causality_check_covers_every_depth_and_catches_an_mtp_leak():
    model = build(depth=2).eval()
    assert find_leaks(model) == []
    honest = model.mtp_hidden
    # a one-token-too-far input: depth d at i gets token i + d + 1, the very token it predicts
    model.mtp_hidden = lambda x, x0, masks: honest(x, x0.roll(-1, dims=1), masks)
    leaks = find_leaks(model)
    for d in (1, 2):
        assert any(s.startswith(f"mtp{d}_logits: changing tokens") for s in leaks), leaks
        assert any(s.startswith(f"mtp{d}_logits: position") and "gradient" in s for s in leaks), leaks
    assert not any(s.startswith("logits:") for s in leaks)  # the main head is untouched by the leak


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
def test_every_depth_keeps_documents_apart_and_a_depth_without_masks_is_caught(grad):
    """Change every token of the first documents (before the EOT at 9 in row 0, at 5 in row 1): no output of any
    depth at a later document's index moves (index i belongs to position i's document). The same check catches MTP
    blocks that attend causally across documents, as a block given no masks would."""
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
    model.mtp_hidden = lambda x, x0, masks: honest(x, x0, {True: None, False: None})  # plain causal attention
    leaky = moved()
    assert leaky["logits"] == 0.0 and leaky["mtp1_logits"] > 1e-3 and leaky["mtp2_logits"] > 1e-3


def test_training_loss_is_next_token_loss_plus_weighted_mean_of_mtp_losses():
    """Every depth-d target in the stream counts, across document boundaries too: where a document ends within d
    tokens, depth d predicts the next one's first tokens, as the next-token loss predicts its EOT."""
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
    ckpt = build(depth=2, vocab=50304, mtp_weight=0.7, mtp_weight_schedule="constant", activation_checkpointing=1)
    ckpt.load_state_dict(model.state_dict())
    loss_ckpt = ckpt.train()(idx, targets)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert not name.startswith("mtp.") or p.grad.abs().max() > 0, name  # every MTP weight learns


def test_validation_loss_excludes_the_aux_loss():
    """Same weights, different MTP weights: the eval-mode loss (what evaluate() reports) never changes and equals
    the loss of the model without MTP modules; the training-mode loss does change."""
    model = build(depth=2, mtp_weight_schedule="constant")
    no_mtp = build(depth=0)
    no_mtp.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    idx, targets = torch.randint(0, VOCAB, (2, T)), torch.randint(0, VOCAB, (2, T))
    evals, trains = [], []
    with torch.no_grad():
        for w in (0.0, 0.3, 5.0):
            model.mtp_weight.fill_(w)
            evals.append(model.eval()(idx, targets))
            trains.append(model.train()(idx, targets))
        reference, train_reference = no_mtp.eval()(idx, targets), no_mtp.train()(idx, targets)
    assert all(torch.equal(e, reference) for e in evals)
    assert torch.equal(trains[0], train_reference) and trains[0] < trains[1] < trains[2]


def test_the_training_loop_logs_val_loss_without_and_train_loss_with_the_aux_loss(shards, tmp_path):
    """At initialisation every head is uniform (zero-init), so each loss is exactly ln(256): the logged train loss of
    step 1 is (1 + w) ln 256 and the validation loss stays ln 256."""
    summary = mtp.main(small_args(*shards, tmp_path, num_iterations=1, val_every=1, mtp_weight=4,
                                  mtp_weight_schedule="constant"))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert train[1] == pytest.approx(5 * math.log(256), abs=1e-3)
    assert val[0] == pytest.approx(math.log(256), abs=1e-3)


@pytest.mark.parametrize("schedule, zero_at, expected", [
    ("constant", 1.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 1.0, [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", 1.0, [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0]),
    ("linear", 0.5, [1.0, 0.5, 0.0, 0.0, 0.0]),
    ("cosine", 0.5, [1.0, 0.5, 0.0, 0.0, 0.0]),
])
def test_schedule_sets_the_weight_buffer_and_the_windows_in_place(schedule, zero_at, expected):
    model = build(depth=1, randomise=False, mtp_weight=0.4, mtp_weight_schedule=schedule, mtp_weight_zero_at=zero_at,
                  window_blocks="1,2,3,4")
    buffer, windows = model.mtp_weight, model.windows
    assert isinstance(buffer, torch.Tensor) and buffer.ndim == 0 and "mtp_weight" in dict(model.named_buffers())
    assert buffer.item() == pytest.approx(0.4)  # before the first schedule() call: the starting weight
    seen, long_windows = [], []
    for progress in (0.0, 0.25, 0.5, 0.75, 1.0):
        model.schedule(progress)
        assert model.mtp_weight is buffer and model.windows is windows  # in place: torch.compile sees the same tensors
        seen.append(buffer.item())
        long_windows.append(windows[0].item())
    assert seen == pytest.approx([0.4 * e for e in expected], abs=1e-7)
    assert long_windows == [128, 256, 384, 512, 512]  # the baseline's window schedule still runs
    assert model.state_dict()["mtp_weight"].item() == pytest.approx(0.4 * expected[-1], abs=1e-7)  # checkpointed


@pytest.mark.parametrize("flags", [["--mtp_weight_schedule=step"], ["--mtp_weight_zero_at=0"], ["--mtp_depth=-1"],
                                   ["--mtp_depth=24"], ["--attention=sdpa", "--seq_len=8", "--mtp_depth=8"]])
def test_bad_mtp_flags_are_errors(flags):
    """A flag's own range when the flags are parsed; a depth the stream cannot hold when the model's config is."""
    with pytest.raises(SystemExit, match="error: --mtp_"):
        args, _ = mtp.parse_args(["--preset=tiny", "--device_batch_tokens=24", *flags])  # 24-token streams
        mtp.GPTConfig.from_args(args)


def test_extra_flops_are_described_counted_and_logged(shards, tmp_path):
    args, _ = mtp.parse_args([])  # the 124M preset
    with torch.device("meta"):
        model = mtp.GPT(mtp.GPTConfig.from_args(args))
    assert sum(p.numel() for p in model.mtp.parameters()) == 2 * 768 * 768 + 12 * 768 * 768 + 4 == 8_257_540
    line = model.describe()
    assert line.startswith("MTP: depth 1 adds 0.294 GFLOPs per token (+32.8% ")  # the head is most of it: 6 x 38.6M
    main, extra = mtp.training_flops_per_token(model.config)
    attention = 12 * 768 * 1408  # a causal row of the last stage's long window, as tests/test_model.py counts it
    assert main == 6 * (84_934_656 + 50304 * 768) + 12 * attention == 897_122_304
    assert extra == 6 * (2 * 768 * 768 + 12 * 768 * 768 + 50304 * 768) + attention
    # what torch's FLOP counter measures for one training step over a 1408-token causal row, depth 2: the MTP blocks
    # and the head run on every position (the last d positions of depth d have no target: their loss is ignored, so
    # every depth's head loss has the trunk's shapes and one compiled graph serves them all)
    args, _ = mtp.parse_args(["--attention=sdpa", "--seq_len=1408", "--mtp_depth=2"])
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        model = mtp.GPT(mtp.GPTConfig.from_args(args))
        idx = torch.zeros(1, 1408, dtype=torch.long)
        model(idx, idx).backward()
    main, extra = mtp.training_flops_per_token(model.config)
    assert counter.get_total_flops() == 1408 * (main + extra)
    summary = mtp.main(small_args(*shards, tmp_path, num_iterations=1))  # the training loop writes it to the log
    assert "\n# MTP: depth 1 adds " in (tmp_path / f"{summary['run_id']}.txt").read_text()


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


def test_with_mtp_weight_zero_the_script_trains_exactly_like_the_baseline(shards, tmp_path):
    """Nothing but MTP differs: with weight 0 the aux loss contributes no gradient to the shared weights, the MTP
    modules are built after the main model (same initial weights), so the curves match the baseline's."""
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
