"""bench.py --gpu-check quick on CPU: its planner, its measurements (attention keys, MFU, compile breakdown,
kernel classes, idle gaps, ceilings) and its worker, with a tiny model and compile off; a kill, an exception,
SIGINT and a short budget each leave a report of what was measured. The tests stage's --scripts filter is here
too."""
import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from tests.helpers import ROOT, SCRIPTS, load_script, read_log
from tests.test_bench import make_proxy  # the race's proxy layout, small

bench = load_script(ROOT / "bench.py")
BASE = ROOT / "train_gpt2.py"
# the tiny preset in three batch stages of 256, 512 and 768 tokens (micro-batches of 256), vocab 256: the
# proxy shards below hold ids < 256 and no <|endoftext|>, so each 256-token stream is one document
TINY = ["--preset=tiny", "--vocab_size=256", "--batch_tokens=768", "--device_batch_tokens=256", "--compile=0"]
LAYOUT = [bench.EOT, 11, 12, bench.EOT, 13, 14, 15, 16]  # documents of 3 and 5 tokens


@pytest.fixture(autouse=True)
def fast_cpu(monkeypatch):
    """Tiny models run faster on one thread, and far faster when other processes share the cores (each thread
    pool then waits on the others). --kernels=1 runs the kernels' PyTorch reference here: under test a CPU
    runs them in Triton's interpreter (tests/test_kernels.py does), which takes seconds a step."""
    monkeypatch.setattr(importlib.import_module("kernels._dispatch"), "INTERPRET", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def options(tmp_path, proxy=True, **changes):
    proxy_dir = make_proxy(tmp_path / "proxy") if proxy else tmp_path / "none"
    o = bench.CheckOptions(scripts=[BASE], flags=TINY, steps=2, minutes=0.02, val_every=50, val_tokens=2048,
                           budget_s=600.0, proxy_dir=proxy_dir, records=tmp_path / "records",
                           gemm_shapes={"MLP up": (64, 32, 128), "head": (64, 32, 256)}, copy_mib=4,
                           device="cpu (test)", command="python bench.py --gpu-check quick")
    for name, value in changes.items():
        setattr(o, name, value)
    return o


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def in_process(clock=time.monotonic):
    """A runner that runs the worker in this process (its console is pytest's), returning what run_logged
    would."""
    def run(cmd, log_path, timeout_s, env):
        log_path.write_text("$ " + " ".join(map(str, cmd)) + "\n")
        t0 = clock()
        bench.quick_worker(cmd[-1], clock=clock)
        return 0, clock() - t0, False
    return run


def tar_names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


# ---- the planner ----

def test_the_planner_runs_what_fits_and_says_why_it_skips_the_rest():
    est = bench.Estimate
    estimates = dict(a=est(10.0, ""), b=est(None, "no proxy shards"), c=est(100.0, ""), d=est(20.0, ""))
    needs = {"d": "a"}
    assert bench.plan_next("abcd", estimates, {}, 0.0, 50.0, needs) == ("a", {})
    name, skipped = bench.plan_next("abcd", estimates, {"a": "ok"}, 10.0, 50.0, needs)
    assert name == "d"
    assert skipped == {"b": "skipped: no proxy shards", "c": "skipped: needs ~100 s, 40 s left"}
    decided = {"a": "ok", "b": "x", "c": "x", "d": "ok"}
    assert bench.plan_next("abcd", estimates, decided, 40.0, 50.0, needs) == (None, {})
    name, skipped = bench.plan_next("abcd", estimates, {"a": "failed: RuntimeError: boom"}, 10.0, 50.0, needs)
    assert name is None and skipped["d"] == "skipped: needs the a, which failed"
    _, skipped = bench.plan_next("abcd", estimates, {}, 45.0, 50.0, needs)  # 5 s left: nothing fits
    assert skipped["a"] == "skipped: needs ~10 s, 5 s left"
    assert skipped["d"] == "skipped: needs the a, which did not run"


def test_estimates_start_from_priors_and_follow_the_measurements():
    batches, flops = [131072, 262144, 393216], 0.7414e9  # the 124M preset's stages; its 6N per token
    o = bench.CheckOptions(scripts=SCRIPTS, steps=4)
    order = bench.quick_items(o)
    assert order[:4] == ["ceilings", "baseline", "stages", "profile"] and order[-1] == "race"
    assert order[4:6] == ["idea train_gpt2_mla.py", "idea train_gpt2.py --kernels=1"]  # the race's idea first
    assert len(order) == 4 + (len(SCRIPTS) - 1) + 1 + 1  # the idea scripts, baseline --kernels=1, the race
    m = bench.Measured(batches, flops)
    e = bench.quick_estimates(order, m, o, 500.0)
    assert e["baseline"].seconds == bench.SETUP_PRIOR_S and "prior" in e["baseline"].why
    assert m.step(2) == (bench.STEP_PRIOR_S, "prior")  # no ceiling, no datasheet peak, nothing timed
    m.peak_tflops = 989.0  # then the datasheet's peak, then the measured ceiling, at STEP_MFU_PRIOR
    assert m.step(2)[0] == pytest.approx(393216 * flops / (bench.STEP_MFU_PRIOR * 989e12))
    m.gemm_tflops = 700.0
    assert m.step(2)[0] == pytest.approx(393216 * flops / (bench.STEP_MFU_PRIOR * 700e12))
    m.setup_s, m.step_s = 200.0, {0: 0.35}  # the baseline measured: its set-up, then stage 1 timed
    assert m.step(2) == (pytest.approx(1.05), "scaled from stage 1")
    m.step_s.update({1: 0.6, 2: 0.9})
    e = bench.quick_estimates(order, m, o, 500.0)
    assert e["baseline"].seconds == 200.0
    assert e["stages"].seconds == pytest.approx((0.35 + 0.6 + 0.9) * (1 + 4))
    assert e["stages"].params == {"steps": 4}
    assert e["profile"].seconds == pytest.approx(2 * 0.9 + bench.PROFILE_FIXED_S)
    idea = bench.IDEA_COMPILE_FACTOR * 200 + (1 + 4) * bench.IDEA_STEP_FACTOR * 0.9 + bench.TEARDOWN_S
    assert e["idea train_gpt2_moe.py"].seconds == pytest.approx(idea)
    m.idea_setup_s = {"train_gpt2_mla.py": 150.0, "train_gpt2.py --kernels=1": 90.0}  # the slowest idea's
    idea = 150.0 + (1 + 4) * bench.IDEA_STEP_FACTOR * 0.9 + bench.TEARDOWN_S
    e = bench.quick_estimates(order, m, o, 500.0)["idea train_gpt2_moe.py"]
    assert e.seconds == pytest.approx(idea) and "slowest idea" in e.why
    m.idea_setup_s = {}
    m.proxy = "no race: no proxy shards"
    race = bench.quick_estimates(order, m, o, 500.0)["race"]
    assert race == bench.Estimate(None, "no race: no proxy shards")


def test_the_stages_shrink_their_steps_to_fit():
    assert bench.fit_steps([1.0, 2.0, 3.0], 30.0, 4) == 4  # 6 s x (1 + 4) = 30 s
    assert bench.fit_steps([1.0, 2.0, 3.0], 20.0, 4) == 2  # 18 s
    assert bench.fit_steps([1.0, 2.0, 3.0], 5.0, 4) == 1  # not even 12 s: the planner skips the phase
    m = bench.Measured([100, 200, 300], 1e6, step_s={0: 1.0, 1: 2.0, 2: 3.0})
    e = bench.quick_estimates(["stages"], m, bench.CheckOptions(scripts=[], steps=4), 20.0)["stages"]
    assert e.params == {"steps": 2} and e.seconds == 18.0


def test_the_race_fills_what_is_left_in_quarter_minutes():
    o = bench.CheckOptions(scripts=SCRIPTS)
    cold = bench.Measured([131072, 262144, 393216], 0.74e9, setup_s=100.0, step_s={0: 0.3, 1: 0.6, 2: 0.9})
    warm = bench.Measured(**dict(vars(cold), idea_setup_s={"train_gpt2_mla.py": 120.0}))  # the idea ran first
    for m in (cold, warm):
        e = bench.race_estimate(m, o, 400.0, 100.0)
        minutes = e.params["minutes"]
        assert minutes >= bench.RACE_MIN_MINUTES and minutes * 4 == int(minutes * 4) and e.seconds <= 400.0
        longer = bench.CheckOptions(scripts=SCRIPTS, minutes=minutes + 0.25)
        more = bench.race_estimate(m, longer, 400.0, 100.0)
        assert more.seconds > 400.0  # a quarter minute more would not fit
    # an idea compiled earlier in the command starts warm: less set-up, more training time
    assert bench.race_estimate(warm, o, 400.0, 100.0).params["minutes"] > \
        bench.race_estimate(cold, o, 400.0, 100.0).params["minutes"]
    m = warm
    short = bench.race_estimate(m, o, 100.0, 100.0)  # under a minute each: the planner skips it, saying why
    assert short.params["minutes"] == bench.RACE_MIN_MINUTES and short.seconds > 100.0
    name, skipped = bench.plan_next(["race"], {"race": short}, {"baseline": "ok"}, 0.0, 100.0)
    assert name is None and re.fullmatch(r"skipped: needs ~\d+ s, 100 s left", skipped["race"])
    fixed = bench.race_estimate(m, bench.CheckOptions(scripts=SCRIPTS, minutes=0.5), 1000.0, 100.0)
    assert fixed.params["minutes"] == 0.5  # --minutes wins


# ---- the measurements ----

def test_attention_keys_count_what_the_document_masks_allow():
    idx = torch.tensor([LAYOUT])
    # documents of 3 and 5 tokens: positions 0 1 2 | 0 1 2 3 4; a window of 4 keys caps the last two at 4
    assert int(bench.attention_keys(idx, 4)) == (1 + 2 + 3) + (1 + 2 + 3 + 4 + 4) == 20
    assert int(bench.attention_keys(idx, 100)) == 21 and int(bench.attention_keys(idx, 1)) == 8
    # a stream that starts inside a document: its first tokens are one document from the stream's start
    assert int(bench.attention_keys(torch.tensor([[7, 8, bench.EOT, 9]]), 4)) == 1 + 2 + 1 + 2
    assert int(bench.attention_keys(torch.tensor([LAYOUT, [7] * 8]), 4)) == 20 + (1 + 2 + 3 + 4 * 5)


def test_mfu_arithmetic():
    assert bench.attention_flops(64, [2.5, 3.5]) == 12 * 64 * 6
    assert bench.mfu(6e8, 1e6, 1000.0) == pytest.approx(0.6) and bench.mfu(6e8, 1e6, None) is None
    figures = bench.stage_mfus(6e8, 2e8, 1e6, 1000.0, 800.0)
    assert figures == pytest.approx(dict(mfu_6n_peak=0.6, mfu_6n_ceiling=0.75, mfu_attention_peak=0.8,
                                         mfu_attention_ceiling=1.0))
    assert bench.stage_mfus(6e8, 2e8, 1e6, None, 800.0)["mfu_6n_peak"] is None
    # the 124M baseline: 6N from the FLOP counter's matmuls, 6 x 114,132,048 weights that multiply (blocks, head,
    # the gates); active adds the 80 scalars, which multiply nothing in a matmul
    module = load_script(BASE)
    total, active, flops, matmul = bench.model_costs(module, module.parse_args([])[0])
    assert matmul == 6 * 114_132_048 and matmul < flops
    assert active == 114_132_048 + 80 and total == 539_100_320


def test_compile_breakdown_takes_each_phase_s_own_time():
    # compile_times' aggregate timers of one compiled forward+backward (torch 2.13, CPU): they nest
    timers = {"_compile.compile_inner": 12.3632, "OutputGraph.call_user_compiler": 12.2980,
              "create_aot_dispatcher_function": 11.7542, "compile_fx_inner": 13.0392,
              "compile_fx.<locals>.bw_compiler": 1.9752, "GraphLowering.codegen": 8.5502}
    b = bench.compile_breakdown(timers)
    assert b["dynamo_s"] == pytest.approx(12.3632 - 12.2980)
    assert b["aot_s"] == pytest.approx(11.7542 - (13.0392 - 1.9752))
    assert b["inductor_s"] == pytest.approx(13.0392 + 12.2980 - 11.7542)
    assert b["dynamo_s"] + b["aot_s"] + b["inductor_s"] == pytest.approx(b["total_s"]) == 12.3632 + 1.9752
    assert b["timers"] == dict(dynamo="_compile.compile_inner", backend="OutputGraph.call_user_compiler",
                               aot="create_aot_dispatcher_function", inductor="compile_fx_inner",
                               backward="compile_fx.<locals>.bw_compiler")
    assert bench.compile_breakdown({})["total_s"] is None  # nothing compiled (compile off)


KERNELS = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "GEMM"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "GEMM"),
    ("triton_tem_fused_mm_3", "GEMM"), ("_xxt_kernel", "GEMM"), ("aten::mm", "GEMM"),
    ("triton_tem_fused_0", "attention"), ("triton_tem_fused_zeros_1", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_poi_fused__to_copy_add_mul_0", "elementwise/reduction"),
    ("triton_red_fused__log_softmax_1", "elementwise/reduction"),
    ("triton_per_fused_rms_norm_2", "elementwise/reduction"), ("_softcap_ce_kernel", "elementwise/reduction"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
     "elementwise/reduction"),
    ("aten::add_", "elementwise/reduction"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>",
     "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("Memcpy DtoD (Device -> Device)", "other"), ("Memset (Device)", "other"),
]


@pytest.mark.parametrize("name,kind", KERNELS, ids=[k[0][:40] for k in KERNELS])
def test_kernel_classes(name, kind):
    assert bench.kernel_class(name) == kind


def test_profile_summary_of_kernel_intervals():
    events = [("sm90_xmma_gemm_bf16", 0, 100), ("triton_poi_fused_add_1", 10, 20),  # inside the GEMM's time
              ("triton_tem_fused_0", 150, 50), ("triton_red_fused_sum_2", 180, 40),  # overlapping, to 220
              ("void at::native::multi_tensor_apply_kernel<FusedAdam>", 300, 20),
              ("ncclDevKernel_AllReduce", 400, 10), ("Memcpy DtoD (Device -> Device)", 500, 5)]
    s = bench.profile_summary(list(reversed(events)), top_gaps=3)  # any order
    assert (s["span_ms"], s["busy_ms"], s["idle_ms"]) == pytest.approx((0.505, 0.205, 0.300))
    assert s["idle_share"] == pytest.approx(300 / 505) and s["kernels"] == 7
    assert [g["ms"] for g in s["largest_gaps"]] == pytest.approx([0.09, 0.08, 0.08])
    assert s["largest_gaps"][0] == dict(ms=pytest.approx(0.09), at_ms=pytest.approx(0.41),
                                        after="ncclDevKernel_AllReduce",
                                        before="Memcpy DtoD (Device -> Device)")
    assert s["largest_gaps"][1]["after"] == "triton_red_fused_sum_2"  # the kernel that ended last before it
    ms = {name: c["ms"] for name, c in s["classes"].items()}
    assert ms == pytest.approx({"GEMM": 0.1, "attention": 0.05, "elementwise/reduction": 0.06,
                                "optimizer": 0.02, "communication": 0.01, "other": 0.005})
    assert sum(c["share"] for c in s["classes"].values()) == pytest.approx(1.0)


def test_ceilings_on_a_cpu_with_small_shapes():
    r = bench.measure_ceilings(torch.device("cpu"), {"up": (64, 32, 128), "down": (64, 128, 32)}, copy_mib=4)
    assert [g["name"] for g in r["gemm"]] == ["up", "down"] and r["peak_tflops"] is None
    for g in r["gemm"]:
        assert g["tflops"] == pytest.approx(2 * 64 * 32 * 128 / (g["ms"] / 1000) / 1e12) and g["tflops"] > 0
    assert r["gemm_ceiling_tflops"] == max(g["tflops"] for g in r["gemm"]) and r["copy_gb_per_s"] > 0


def test_synthetic_data_is_documents_of_2048_tokens(tmp_path):
    o = options(tmp_path, proxy=False)
    glob, what = bench.quick_train_files(o, tmp_path / "shards", 4096, 50304)
    (path,) = tmp_path.glob("shards/bench_train_*.bin")
    tokens = bench.fineweb.check_shard(str(path))
    data = load_script(BASE).read_shard(str(path))
    assert tokens == len(data) == 4 * 4096 + 1 and "2,048-token documents" in what
    assert (data == bench.EOT).nonzero()[0].tolist() == list(range(0, len(data), 2048))
    make_proxy(tmp_path / "proxy")
    proxy_glob, _ = bench.quick_train_files(options(tmp_path), tmp_path / "x", 4096, 50304)
    assert proxy_glob.endswith("enwiki_train_*.bin")
    bench.write_synthetic_shards(tmp_path / "small", 1000, 100, vocab_size=256)  # no <|endoftext|> in 256 ids
    assert load_script(BASE).read_shard(str(tmp_path / "small" / "bench_train_000001.bin")).max() < 256


# ---- the worker: every phase on a CPU, and what a kill, an exception, SIGINT or a short budget leave ----

def test_quick_check_on_a_cpu_writes_every_phase(tmp_path):
    out = tmp_path / "out"
    report = bench.gpu_check("quick", out, options(tmp_path), runner=in_process())["quick"]
    files = {p.name for p in out.iterdir()}
    assert {"environment.txt", "quick.json", "quick.md", "quick_logs.tar.gz"} <= files <= {
        "environment.txt", "quick.json", "quick.md", "quick_logs.tar.gz", "race_plot.png"}  # at most 8
    assert all(p.is_file() for p in out.iterdir())
    assert json.loads((out / "quick.json").read_text()) == json.loads(json.dumps(report))
    items = report["items"]
    assert list(items) == ["ceilings", "baseline", "stages", "profile", "idea train_gpt2_mla.py",
                           "idea train_gpt2.py --kernels=1", "race"]
    assert {name: item["status"] for name, item in items.items()} == dict.fromkeys(items, "ok")
    assert report["problems"] == [] and report["worker"]["status"] == "ok"
    assert all(item["estimate_s"] is not None and item["seconds"] is not None for item in items.values())

    assert items["baseline"]["result"]["stage_batches"] == [256, 512, 768]
    rows = items["stages"]["result"]
    assert [r["batch_tokens"] for r in rows] == [256, 512, 768] and [r["steps"] for r in rows] == [2, 2, 2]
    assert [r["windows"] for r in rows] == [[128, 128], [256, 128], [512, 256]]  # the tiny's 1, 2, 4 blocks
    # 256-token streams with no <|endoftext|>: a query at t sees min(t + 1, window) keys (layer 0 short, 1 long)
    keys_128 = sum(min(t + 1, 128) for t in range(256)) / 256
    assert [r["keys_long"] for r in rows] == [keys_128, 128.5, 128.5]
    assert [r["keys_short"] for r in rows] == [keys_128, keys_128, 128.5]
    flops_6n = bench.model_costs(load_script(BASE), load_script(BASE).parse_args(TINY)[0])[3]
    ceiling = items["ceilings"]["result"]["gemm_ceiling_tflops"]
    for r in rows:
        assert r["gflops_attention"] == pytest.approx(12 * 64 * (r["keys_long"] + r["keys_short"]) / 1e9)
        assert r["mfu_6n_ceiling"] == pytest.approx(flops_6n * r["tokens_per_s"] / (ceiling * 1e12))
        assert r["mfu_6n_peak"] is None and r["tokens_per_s"] > 0  # no datasheet peak for a CPU
    profile = items["profile"]["result"]
    assert profile["batch_tokens"] == 768 and profile["micro_steps"] == 3
    assert profile["classes"]["GEMM"]["ms"] > 0 and profile["busy_ms"] <= profile["span_ms"]
    assert items["idea train_gpt2_mla.py"]["result"]["describe"].startswith("MLA:")
    assert items["idea train_gpt2.py --kernels=1"]["result"]["batch_tokens"] == 768
    race = items["race"]["result"]
    assert race["minutes"] == 0.02
    assert [s["script"] for s in race["summaries"]] == ["train_gpt2.py", "train_gpt2_mla.py"]
    assert bench.leaderboard.check_record(tmp_path / race["record"], "proxy") == []

    md = (out / "quick.md").read_text()
    for title in ("## Plan", "## 1. The device's ceilings", "## 2. The baseline's compile",
                  "## 3. The baseline's", "## 4. Profile", "## 5. Ideas", "## 6. Race", "## Problems"):
        assert title in md, title
    assert "| 3 | 768 | 512 / 256 | 2 |" in md and "| train_gpt2_mla.py |" in md
    assert "MLA: the decoding cache" in md
    names = tar_names(out / "quick_logs.tar.gz")
    assert {"quick_logs/profile_key_averages.txt", "quick_logs/compile_times.txt",
            "quick_logs/worker_console.txt"} <= set(names)
    assert any(n.startswith("quick_logs/race_record/") and n.endswith("README.md") for n in names)
    with tarfile.open(out / "quick_logs.tar.gz") as tar:  # the check never validates outside the race
        tar.extractall(tmp_path / "logs", filter="data")
    (log,) = (tmp_path / "logs" / "quick_logs" / "baseline").glob("train_gpt2_*.txt")
    assert read_log(log)[1] == {}  # no val_loss step line


def test_an_exception_ends_its_phase_only(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cuBLAS\nis not there")
    monkeypatch.setattr(bench, "measure_ceilings", broken)
    o = options(tmp_path, proxy=False, race_script=BASE)  # the ideas: the baseline with --kernels=1 only
    report = bench.gpu_check("quick", tmp_path / "out", o, runner=in_process())["quick"]
    status = {name: item["status"] for name, item in report["items"].items()}
    assert status["ceilings"] == "failed: RuntimeError: cuBLAS is not there"
    ran = ("baseline", "stages", "profile", "idea train_gpt2.py --kernels=1")
    assert [status[name] for name in ran] == ["ok"] * 4
    assert status["race"].startswith("skipped: no race: the race needs proxy shards")
    rows = report["items"]["stages"]["result"]
    assert all(r["mfu_6n_ceiling"] is None for r in rows)  # no ceiling measured: that MFU is n/a
    assert report["problems"] == ["ceilings: failed: RuntimeError: cuBLAS is not there"]
    md = (tmp_path / "out" / "quick.md").read_text()
    assert "- ceilings: failed: RuntimeError: cuBLAS is not there" in md and "## 1. The device's" not in md
    with tarfile.open(tmp_path / "out" / "quick_logs.tar.gz") as tar:
        trace = tar.extractfile("quick_logs/tracebacks.txt").read().decode()
    assert trace.startswith("== ceilings\nTraceback") and "RuntimeError: cuBLAS" in trace


class Killed(BaseException):
    """A SIGKILL, as the worker sees it: nothing after it runs, nothing more is written."""


def test_a_worker_killed_mid_way_keeps_the_phases_before(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(bench, "baseline_stages", killed)
    runner = in_process()

    def run(cmd, log_path, timeout_s, env):
        with contextlib.suppress(Killed):
            return runner(cmd, log_path, timeout_s, env)
        return -9, 1.0, False
    out = tmp_path / "out"
    bench.gpu_check("quick", out, options(tmp_path, proxy=False), runner=run)
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())
    report = json.loads((out / "quick.json").read_text())
    status = {name: item["status"] for name, item in report["items"].items()}
    assert status["ceilings"] == status["baseline"] == "ok"
    assert status["stages"] == "killed: the worker ended (exit code -9) during it"
    assert status["profile"] == status["race"] == "not run: the worker ended (exit code -9) before it"
    assert report["items"]["baseline"]["result"]["stage_batches"] == [256, 512, 768]  # its figures survive
    assert report["worker"] == dict(status="exit code -9", rc=-9, seconds=1.0)
    md = (out / "quick.md").read_text()
    assert "## 1. The device's ceilings" in md and "## 2. The baseline's compile" in md and "## 3." not in md
    assert "- worker: exit code -9" in md
    assert any(n.startswith("quick_logs/baseline/train_gpt2_") for n in tar_names(out / "quick_logs.tar.gz"))


def test_sigint_at_the_budget_stops_the_worker_which_writes_what_it_has(tmp_path):
    """The real worker process, sent SIGINT while it times the batch stages (as run_logged does at the
    budget): it records the phase as stopped, the later ones as not run, and writes; the phases before keep
    their figures."""
    def run(cmd, log_path, timeout_s, env):
        out = json.loads(cmd[-1].read_text())["out"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if json.loads(open(f"{out}/quick.json").read())["items"]["stages"]["status"] == "running":
                        break
                time.sleep(0.02)
            time.sleep(0.3)  # inside the stages' 3 x 1001 steps (minutes of CPU, so a loaded machine still lands it)
            proc.send_signal(signal.SIGINT)
            return proc.wait(timeout=60), 1.0, True
    out = tmp_path / "out"
    o = options(tmp_path, steps=1000, proxy=False, flags=TINY + ["--num_iterations=3300"])  # 1100 steps a stage
    report = bench.gpu_check("quick", out, o, runner=run)["quick"]
    status = {name: item["status"] for name, item in report["items"].items()}
    assert status == dict(ceilings="ok", baseline="ok", stages="stopped at the budget",
                          **dict.fromkeys(list(status)[3:], "not run: stopped at the budget")), status
    assert report["worker"] == dict(status="stopped at the budget", rc=0, seconds=1.0)  # it ended itself
    assert report["items"]["baseline"]["result"]["stage_batches"] == [256, 512, 768]
    md = (out / "quick.md").read_text()
    assert "## 2. The baseline's compile" in md and "- stages: stopped at the budget" in md


def test_a_script_ended_by_a_signal_counts_as_stopped(tmp_path, monkeypatch):
    """A train script whose run a signal ended exits 130 (SIGINT) or 143 (SIGTERM): the budget, not a
    failure."""
    def interrupted(*args, **kwargs):
        raise SystemExit(130)
    monkeypatch.setattr(bench, "profile_step", interrupted)
    o = options(tmp_path, proxy=False)
    report = bench.gpu_check("quick", tmp_path / "out", o, runner=in_process())["quick"]
    status = [item["status"] for item in report["items"].values()]
    assert status[:4] == ["ok", "ok", "ok", "stopped at the budget"]
    assert set(status[4:]) == {"not run: stopped at the budget"}


def test_a_short_budget_skips_what_no_longer_fits_from_measured_estimates(tmp_path, monkeypatch):
    """A fake clock: the baseline's set-up 'takes' 400 s of the 500 s the phases have, so its stages and
    profile still fit, but an idea, estimated at 1.3 x that set-up, no longer does."""
    clock, real = Clock(), bench.setup_script

    def slow_setup(path, flags):
        module, run, figures = real(path, flags)
        clock.now += 400.0
        return module, run, dict(figures, setup_s=400.0)
    monkeypatch.setattr(bench, "setup_script", slow_setup)
    o = options(tmp_path, proxy=False, budget_s=540.0)  # 540 - 30 s grace - 10 s packing: 500 s of phases
    report = bench.gpu_check("quick", tmp_path / "out", o, runner=in_process(clock), clock=clock)["quick"]
    items = report["items"]
    assert report["worker_budget_s"] == 500.0
    assert [items[n]["status"] for n in ("ceilings", "baseline", "stages", "profile")] == ["ok"] * 4
    assert items["baseline"]["estimate_s"] == bench.SETUP_PRIOR_S
    for idea in ("idea train_gpt2_mla.py", "idea train_gpt2.py --kernels=1"):
        status = items[idea]["status"]
        assert re.fullmatch(r"skipped: needs ~52\d s, 100 s left", status), status
        assert items[idea]["why"].startswith("1.3 x the baseline's set-up (measured 400 s)")
    assert items["race"]["status"].startswith("skipped: no race")
    assert report["problems"] == []  # skips for the budget are the plan, not problems
    assert "| idea train_gpt2_mla.py | 5" in (tmp_path / "out" / "quick.md").read_text()


def test_quick_refuses_bad_flags_before_any_work(tmp_path):
    o = options(tmp_path, proxy=False, flags=TINY + ["--no_such_flag=1"])
    with pytest.raises(SystemExit, match="unknown flag '--no_such_flag=1'"):
        bench.gpu_check("quick", tmp_path / "out", o, runner=in_process())
    assert not (tmp_path / "out" / "quick.json").exists()


# ---- the tests stage: --scripts keeps those scripts' tests and the tests tied to no script ----

def test_tests_stage_keeps_the_selected_scripts_tests(tmp_path):
    every = [ROOT / "train_gpt2.py", ROOT / "train_gpt2_mla.py", ROOT / "train_gpt2_moe.py"]
    assert bench.script_test_filter(every, every) is None
    assert bench.script_test_filter([every[2]], every) == \
        "not (train_gpt2.py or train_gpt2_mla.py or test_mla.py)"
    assert bench.script_test_filter([every[0]], every) == \
        "not (train_gpt2_mla.py or test_mla.py or train_gpt2_moe.py or test_moe.py)"
    (run,), note, _ = bench.plan_tests(tmp_path, bench.CheckOptions(scripts=SCRIPTS))
    assert "-k" not in run.cmd and note.startswith("pytest -m gpu tests;")
    (run,), note, _ = bench.plan_tests(tmp_path, bench.CheckOptions(scripts=[ROOT / "train_gpt2_moe.py"]))
    keep = run.cmd[run.cmd.index("-k") + 1]
    assert "train_gpt2.py" in keep and "test_moe.py" not in keep and "-k 'not (train_gpt2.py" in note
    collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p",
                                "no:cacheprovider", "tests/test_gpu.py", "tests/test_moe.py", "-k", keep],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    names = [line for line in collected.stdout.splitlines() if "::" in line]
    assert collected.returncode == 0 and names, collected.stdout + collected.stderr
    assert "tests/test_gpu.py::test_sdpa_backend[train_gpt2_moe.py]" in names
    assert not any("[train_gpt2" in n and "train_gpt2_moe.py" not in n for n in names)  # no other script's
    assert "tests/test_moe.py::test_grouped_gemm_path_on_the_gpu_matches_the_dense_path" in names  # its file
    assert any("test_xxt_kernel" in n for n in names)  # tied to no script: still runs
