"""Mixture of Experts (train_gpt2_moe.py): what the idea promises, as tests.

DeepSeek-V3 section 2.1.2: shared experts plus the top-k of fine-grained routed experts by sigmoid affinity, gates
normalised over the chosen k; auxiliary-loss-free balancing by a per-expert bias that picks experts but never weighs
them and changes only between steps (GPT.schedule), from the loads the step's forwards counted; an optional
sequence-wise balance loss (eq. 17-20). The generic tests (test_causality.py, tests/test_model.py, tests/test_train.py,
...) cover the script too; these check the MoE specifics.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from test_causality import find_leaks
from tests.helpers import (ROOT, assert_reordering_only, decode_in_pieces, load_script, random_model, small_args,
                           ulp_nudged)
from tests.test_attention import document_leaks

moe = load_script(ROOT / "train_gpt2_moe.py")
baseline = load_script(ROOT / "train_gpt2.py")
VOCAB = 512


def build(*flags, randomise=True):
    """A tiny fp32 model (2 layers x 64 wide: 2 shared + top-2 of 16 routed experts of width 64), random weights by
    default: the zero-initialised expert projections would make every routing give the same output."""
    args, _ = moe.parse_args(["--preset=tiny", f"--vocab_size={VOCAB}", *flags])
    torch.manual_seed(0)
    model = moe.GPT(moe.GPTConfig.from_args(args)).float()
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5)
    return model


def tokens(B=2, T=32, seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T))


def naive_moe(layer, x):
    """DeepSeek-V3 eq. 12-16 token by token, expert by expert, with Python loops: the reference for the dispatch."""
    out = torch.zeros_like(x)
    for t, xt in enumerate(x):
        s = torch.sigmoid(layer.router.weight @ xt)
        chosen = (s + layer.expert_bias).topk(layer.top_k).indices.tolist()  # the bias selects ...
        for e in chosen:  # ... the gates are the affinities alone, normalised over the chosen experts
            ffn = layer.proj[e] @ F.relu(layer.fc[e] @ xt).square()
            out[t] += s[e] / s[chosen].sum() * ffn
        if layer.shared is not None:
            out[t] += layer.shared(xt)
    return out


def test_grouped_and_dense_dispatch_equal_a_per_token_loop():
    """Both dispatch paths (the CPU's dense one, the GPU's sort + grouped GEMM, run here in fp32 on the CPU's eager
    torch._grouped_mm) give the per-token loop's output, with a bias that overrides the affinities and experts that
    get no token (empty groups)."""
    layer = build().blocks[0].mlp.eval()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.linspace(-0.5, 0.5, 16))
        layer.expert_bias[:6] = -10.0  # experts 0..5 are never chosen: empty groups in the grouped GEMM
    torch.manual_seed(2)
    x = torch.randn(40, 64)
    with torch.no_grad():
        reference = naive_moe(layer, x)
        dense = layer(x.view(2, 20, 64))[0].view(40, 64)
        scores, top, gates = layer.route(x)
        assert top.min() >= 6
        offsets = torch.bincount(top.flatten(), minlength=16).cumsum(0).int()
        grouped = moe.routed_grouped(x, top, gates, offsets, layer.fc, layer.proj, torch.float32) + layer.shared(x)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_every_token_gets_exactly_top_k_routed_experts(top_k):
    model = build(f"--moe_top_k={top_k}").train()
    layer = model.blocks[0].mlp
    x = torch.randn(50, 64)
    scores, top, gates = layer.route(x)
    assert top.shape == (50, top_k)
    assert all(len(set(row)) == top_k for row in top.tolist())  # k different experts
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    assert (gates > 0).all()
    idx = tokens(B=2, T=32)
    model(idx, idx)
    for m in model.moe_layers():
        assert m.expert_load.sum().item() == 2 * 32 * top_k


def test_load_statistics_and_the_bias_update_on_a_constructed_routing():
    """Router rows so that a token along basis vector j picks experts 2j and 2j+1 (the others score 0): 10 tokens
    of kind 0, 5 of kind 1 and 1 of kind 2 give loads 10, 10, 5, 5, 1, 1 and 0 elsewhere, mean 2. The update is
    gamma * sign(mean - load): down for the four busy experts, up for the rest. Evaluation counts nothing."""
    model = build("--moe_bias_rate=0.01")
    layer = model.blocks[0].mlp
    with torch.no_grad():
        layer.router.weight.zero_()
        for j in range(3):
            layer.router.weight[2 * j:2 * j + 2, j] = 5.0
    kinds = [0] * 10 + [1] * 5 + [2]
    x = torch.stack([F.one_hot(torch.tensor(j), 64).float() for j in kinds])[None]  # (1, 16, 64)
    with torch.no_grad():
        layer.eval()(x)
        assert layer.expert_load.sum() == 0
        layer.train()(x)
    expected = torch.tensor([10, 10, 5, 5, 1, 1] + [0] * 10, dtype=torch.float32)
    assert torch.equal(layer.expert_load, expected)
    model.blocks[1].mlp.expert_load.fill_(2.0)  # an even layer: max / mean 1
    stats = model.log_stats()  # tensors, read when the step is logged; layer 0: 10 / 2
    assert {k: round(float(v), 4) for k, v in stats.items()} == {"moe_load_max/mean": 3.0, "worst": 5.0}
    model.schedule(0.5)
    assert torch.equal(layer.expert_bias, 0.01 * torch.tensor([-1.0] * 4 + [1.0] * 12))
    assert layer.expert_load.sum() == 0


def test_the_forward_never_depends_on_the_accumulated_load_and_only_schedule_moves_the_bias():
    """Causality of the balancing: whatever load the earlier forwards counted, a training forward gives the same
    loss; forwards and backwards never touch the bias, schedule() does (none at progress 0, before the first step,
    and none at 1, the final validation); and the bias does change routing, so this is not vacuous."""
    model = build().train()
    idx = tokens()
    first = model(idx, idx)
    first.backward()
    for m in model.moe_layers():
        m.expert_load.copy_(torch.arange(16.0) * 1000)
    again = model(idx, idx)
    assert torch.equal(first, again)
    assert all(m.expert_bias.abs().sum() == 0 for m in model.moe_layers())
    model.schedule(0.0)  # before the first step: the counts are dropped, no update
    assert all(m.expert_bias.abs().sum() == 0 and m.expert_load.sum() == 0 for m in model.moe_layers())
    model(idx, idx)
    model.schedule(0.1)
    assert all(m.expert_bias.abs().sum() > 0 for m in model.moe_layers())
    assert not torch.equal(model(idx, idx), first)
    biases = [m.expert_bias.clone() for m in model.moe_layers()]
    model.schedule(1.0)  # the final validation: the model as trained, whatever the last step counted
    assert all(torch.equal(m.expert_bias, b) for m, b in zip(model.moe_layers(), biases))


def test_causal_in_training_mode_with_the_balance_loss_on():
    """test_causality.py checks eval mode; training mode counts loads and adds the balance loss: still causal."""
    model = build("--moe_balance_alpha=0.1").train()
    model.blocks[1].mlp.expert_load.fill_(7.0)
    assert find_leaks(model) == []


def test_bias_update_sums_the_loads_of_every_rank(monkeypatch):
    """Under DDP each rank counts its own tokens; schedule() all-reduces them first, so every rank takes the same
    update (here a second rank's loads are added by a stand-in all_reduce)."""
    layer = build("--moe_bias_rate=0.5").blocks[0].mlp
    other_rank = torch.zeros(16)
    other_rank[:8] = 10.0
    monkeypatch.setattr(moe.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(moe.dist, "all_reduce", lambda t: t.add_(other_rank))
    layer.expert_load[8:] = 1.0  # this rank alone would lower experts 8..15
    layer.update_bias()
    assert torch.equal(layer.expert_bias, torch.tensor([-0.5] * 8 + [0.5] * 8))


def test_balance_loss_changes_the_training_loss_not_the_validation_loss():
    """alpha * sum_i f_i P_i (eq. 17-20) per stream: added in training, absent in evaluation; it reaches the router."""
    on, off = build("--moe_balance_alpha=0.01"), build()
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(on.eval()(idx, idx), off.eval()(idx, idx))
    loss_on, loss_off = on.train()(idx, idx), off.train()(idx, idx)
    # f_i P_i summed is 1 for a perfectly even routing and affinities, so per MoE layer the term is near alpha
    assert 2 * 0.01 * 0.5 < (loss_on - loss_off).item() < 2 * 0.01 * 4
    loss_on.backward()
    loss_off.backward()
    router = on.blocks[0].mlp.router.weight.grad - off.blocks[0].mlp.router.weight.grad
    assert router.abs().max() > 0


def test_muon_orthogonalises_each_expert_on_its_own():
    """The stacked (E, out, in) expert weights go to NorMuon (the router too; the balancing bias is a buffer, in no
    optimizer), and each expert's slice of the update is ~orthogonal by itself, while the same experts flattened
    into one matrix would not be: the update is per expert (NorMuon's second moment too)."""
    model = build()
    args, _ = moe.parse_args(["--preset=tiny"])
    adam, muon = moe.build_optimizers(model, args)
    layer = model.blocks[0].mlp
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert {id(layer.fc), id(layer.proj), id(layer.router.weight)} <= in_muon
    assert "expert_bias" not in dict(model.named_parameters()) and "blocks.0.mlp.expert_bias" in model.state_dict()
    torch.manual_seed(3)
    for p in model.parameters():
        p.grad = None
    # each expert's gradient: singular values spread 20x (a Gaussian's ~0 one is left small by 5 steps, by design),
    # and the experts' gradients 100x apart in size
    U, _, Vh = torch.linalg.svd(torch.randn(16, 64, 64))
    spectrum = torch.logspace(-1.3, 0, 64) * torch.logspace(0, 2, 16)[:, None]
    layer.fc.grad = U @ torch.diag_embed(spectrum) @ Vh
    opt = moe.NorMuon([layer.fc], lr=0.1, momentum=0.0, weight_decay=0.0)
    before = layer.fc.detach().clone()
    opt.step()
    update = (before - layer.fc.detach()) / 0.1  # square 64 x 64 slices: scale 1
    singular = torch.linalg.svdvals(update)  # per expert
    assert singular.min() > 0.6 and singular.max() < 1.25
    # orthogonalising the experts as one (1024, 64) matrix instead would all but freeze the small-gradient experts
    joint = moe.zeropower_via_newtonschulz5(layer.fc.grad.reshape(-1, 64)).view(16, 64, 64)
    assert torch.linalg.svdvals(joint[0]).max() < 0.1


def test_moe_every_keeps_the_other_layers_dense():
    model = build("--n_layer=4", "--moe_every=2", randomise=False)
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]


def model_costs(module):
    """(parameters, active parameters, training FLOPs per token) of a script's 124M model on the meta device: the
    FLOPs over a causal row of the last stage's long window (1408 tokens) on SDPA, as tests/test_model.py counts."""
    from torch.utils.flop_counter import FlopCounterMode
    args, _ = module.parse_args(["--attention=sdpa", "--seq_len=1408"])
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
        idx = torch.zeros(1, 1408, dtype=torch.long)
        with counter:
            model(idx, idx).backward()
    return sum(p.numel() for p in model.parameters()), model.num_active_params(), counter.get_total_flops() / 1408


def test_params_and_flops_at_124m_against_the_baseline():
    """Compute-matched defaults: 2 shared + top-2 of 16 routed experts of width 768 = the MLP's 3072 active width, in
    all 11 layers (the attention-free layer 6 too). Per layer the experts hold 18 x 2 x 768^2 weights and the router
    768 x 16, against the MLP's 2 x 768 x 3072; one token uses 4 x 2 x 768^2 of them (the MLP's count) plus the
    router. Active excludes the tables looked up (token embedding, 5 value-embedding tables of 50304 x 768 and the
    bigram table of 251,520 x 768; the head multiplies). Training FLOPs per token are 6 per weight that multiplies
    (plus the baseline's attention): the CPU's dense path, which FlopCounter sees, runs all 16 routed experts, 14 x 2
    x 768^2 weights a layer more than the GPU's grouped path, whose torch._grouped_mm it does not count; that path's
    figure is the baseline's plus 6 x the 11 routers."""
    (total, active, dense_flops), (dense_total, dense_active, baseline_flops) = map(model_costs, (moe, baseline))
    tables = 6 * 50304 * 768 + 251_520 * 768
    mlp, experts, router, skipped = 2 * 768 * 3072, 18 * 2 * 768 * 768, 768 * 16, 14 * 2 * 768 * 768
    assert (dense_total, dense_active, baseline_flops) == (539_100_320, dense_total - tables, 814_553_568)
    assert total == dense_total + 11 * (experts + router - mlp) == 720_901_280
    assert active == dense_active + 11 * router == 114_267_296
    assert dense_flops == baseline_flops + 6 * 11 * (experts + router - mlp) == 1_905_359_328
    assert dense_flops - 6 * 11 * skipped == baseline_flops + 6 * 11 * router == 815_364_576  # the grouped path's
    with torch.device("meta"):
        model = moe.GPT(moe.GPTConfig.from_args(moe.parse_args([])[0]))
    assert all(isinstance(block.mlp, moe.MoE) for block in model.blocks) and model.blocks[6].attn is None
    assert "11 of 11 layers, 2 shared + top-2 of 16 routed experts of width 768 (active width 3072, the MLP's 3072)" \
        in model.describe()


def test_experts_start_as_the_records_mlp():
    """v3's MLP init per expert: c_fc uniform with std 0.5 n_embd^-0.5 (every routed expert's slice and the shared
    experts' c_fc), output projections zero, so each MoE starts as the identity's residual, as the MLP does."""
    model = build("--n_layer=11", "--value_embeds=5", randomise=False)
    bound = 3 ** 0.5 * 0.5 * 64 ** -0.5
    for block in model.blocks:
        layer = block.mlp
        assert all(bound * 0.9 < w.abs().max() <= bound for w in (*layer.fc, layer.shared.c_fc.weight))
        assert layer.proj.abs().max() == 0 and layer.shared.c_proj.weight.abs().max() == 0


def test_the_records_11_layers_decode_as_the_full_forward_and_keep_documents_apart():
    """The v3 layout (no attention in layer 6, key offset, XSA, skip, backout, value embeddings, bigram, smear) with
    an MoE in every layer: KV-cache decoding = the full forward across documents and past the windows, and an
    earlier document moves nothing of a later one (the routing is per token)."""
    deep = ("--n_layer=11", "--value_embeds=5", "--bigram_vocab=1000", "--vocab_size=50304")
    model = random_model(moe, *deep)
    model.windows.copy_(torch.tensor([6, 3]))  # windows shorter than the sequence
    idx = tokens(B=2, T=20) * 97  # ids spread over the vocabulary
    idx[0, 0] = idx[0, 9] = idx[1, 1] = idx[1, 15] = 50256  # documents at positions 0 and 1, and mid-sequence
    with torch.no_grad():
        full = model(idx)
        decoded, _ = decode_in_pieces(model, idx, (1, 1, 5, 5) + (1,) * 8)
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)
    assert all(moved == 0.0 for moved in document_leaks(random_model(moe, *deep), grad=False).values())


def test_compiles_without_graph_breaks_and_matches_eager():
    """torch.compile(fullgraph=True) of a training forward + backward on CPU (the dense path; load counting is an
    in-place buffer update in the graph): the eager loss and gradients up to fp32 reordering (tests/helpers.py),
    the same loads counted."""
    flags = ("--n_layer=1", "--moe_balance_alpha=0.01")
    eager, compiled, reference = build(*flags).train(), build(*flags).train(), build(*flags).train().double()
    nudged = [ulp_nudged(eager, 1), ulp_nudged(eager, 2)]  # with eager: the yardstick (tests/helpers.py)
    idx = tokens(B=1, T=32)
    losses = []
    for model in (eager, torch.compile(compiled, fullgraph=True), reference, *nudged):
        loss = model(idx, idx)
        loss.backward()
        losses.append(loss.detach())
    assert_reordering_only(losses[1], [losses[0], *losses[3:]], losses[2], "loss")
    for (name, p), q, r, *n in zip(eager.named_parameters(), compiled.parameters(), reference.parameters(),
                                   *(m.parameters() for m in nudged)):
        if p.grad is None:  # a parameter this forward does not use
            assert q.grad is None and r.grad is None, name
        else:
            assert_reordering_only(q.grad, [p.grad, *(x.grad for x in n)], r.grad, f"gradient of {name}")
    assert torch.equal(compiled.blocks[0].mlp.expert_load, eager.blocks[0].mlp.expert_load)


def test_training_moves_the_bias_and_checkpoints_keep_it(shards, tmp_path):
    """A short run: the loss falls, the start-up line describes the MoE, and the checkpoint holds a bias that the
    step-by-step updates moved by whole multiples of gamma."""
    summary = moe.main(small_args(*shards, tmp_path, num_iterations=6, val_every=6, save_every=6,
                                  moe_bias_rate=0.01))
    text = (tmp_path / f"{summary['run_id']}.txt").read_text()
    assert "# MoE: 2 of 2 layers, 2 shared + top-2 of 16 routed experts" in text
    step_lines = [line for line in text.splitlines() if line.startswith("step:") and "train_loss" in line]
    assert len(step_lines) == 6 and all(re.search(r" moe_load_max/mean:\d+\.\d\d worst:\d+\.\d\d$", line)
                                        for line in step_lines), step_lines[:2]  # the per-step load, every step
    assert summary["final_val_loss"] < 5.0
    state = torch.load(summary["last_checkpoint"], weights_only=False)["model"]
    bias = state["blocks.0.mlp.expert_bias"]
    steps = bias / 0.01
    assert bias.abs().max() > 0 and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 5


@pytest.mark.parametrize("flag, message", [
    ("--moe_top_k=17", r"--moe_top_k=17: expected an integer in \[1, --n_routed_experts=16\]"),
    ("--moe_top_k=0", r"--moe_top_k=0: expected an integer in \[1"),
    ("--n_routed_experts=0", r"--n_routed_experts=0: expected an integer >= 1"),
    ("--n_shared_experts=-1", r"--n_shared_experts=-1: expected an integer >= 0"),
    ("--moe_expert_hidden=-8", r"--moe_expert_hidden=-8: expected an integer >= 1 \(0: auto"),
    ("--moe_every=3", r"--moe_every=3: expected an integer in \[1, --n_layer=2\]"),
    ("--moe_bias_rate=-0.1", r"--moe_bias_rate=-0.1: expected a number >= 0"),
    ("--moe_balance_alpha=nan", r"--moe_balance_alpha=nan: expected a number >= 0 \(0: off\)"),
])
def test_bad_moe_flags_are_one_line_errors(flag, message):
    with pytest.raises(SystemExit, match=message):  # IdeaFlags.check(), when the flags are parsed
        moe.parse_args(["--preset=tiny", flag])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_gemm_path_on_the_gpu_matches_the_dense_path():
    """Under bf16 autocast on CUDA the layer runs the sort + torch._grouped_mm path: the dense path's output within
    bf16 rounding, gradients included, and compiled without graph breaks."""
    layer = build().blocks[0].mlp.cuda().train()
    x = torch.randn(2, 256, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        grouped = layer(x)[0]
        compiled = torch.compile(layer, fullgraph=True)(x)[0]
    dense = layer(x)[0]  # no autocast: the dense fp32 path
    scale = dense.abs().max()
    assert (grouped.float() - dense).abs().max() < 0.02 * scale
    assert (compiled.float() - dense).abs().max() < 0.02 * scale
    (g_grad,) = torch.autograd.grad(grouped.float().square().sum(), x)
    (d_grad,) = torch.autograd.grad(dense.square().sum(), x)
    assert (g_grad - d_grad).abs().max() < 0.05 * d_grad.abs().max()
