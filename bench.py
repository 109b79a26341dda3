"""How fast a step is, per train script: tokens/s, ms/step, MFU and peak memory on this device.

    python bench.py                                      every train_gpt2*.py, 124M preset, this device
    python bench.py --scripts train_gpt2.py train_gpt2_mla.py --seq_len 4096 --device_batch_size 4
    python bench.py --preset tiny --steps 5 --json       CPU-sized; --json for machines
    python bench.py --race --minutes 5 --train_files 'data/proxy/enwiki_train_*.bin' \\
        --val_files 'data/proxy/owt_val_*.bin'           equal-wall-clock proxy race (records/proxy/)

Each script is measured by running its own main() for --steps optimizer steps on synthetic token shards (uniform
random GPT-2 ids), so the numbers include everything a real step does: the data loader, gradient accumulation,
the optimizers, torch.compile (its warm-up is timed separately, as the script logs it). FLOPs per token come from
torch.utils.flop_counter on one forward+backward at the same shapes (matmuls and attention, the full attention
matrix as in PaLM's MFU convention; FFTs are not counted); MFU divides model FLOPs/s by the device's dense bf16
peak from PEAK_TFLOPS below.
"""
import argparse
import contextlib
import datetime
import gc
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "data"))
import fineweb  # noqa: E402  (the shard writer)
from sample import import_script  # noqa: E402  (imports a train script without side effects)

leaderboard = import_script(ROOT / "records" / "leaderboard.py")  # parses and plots run logs

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; fp32 accumulate where consumer cards differ).
# Matched by substring of torch.cuda.get_device_name(), first match wins: put specific names first.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
               ("RTX 4080", 97.5), ("RTX 3090", 71.0), ("RTX A6000", 154.8), ("V100", 125.0), ("T4", 65.0)]


def peak_tflops(device_name):
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def model_costs(module, args):
    """(total params, active params, training FLOPs per token) of the script's model at these settings."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
        idx = torch.zeros(1, args.seq_len, dtype=torch.long)
    total = sum(p.numel() for p in model.parameters())
    if hasattr(model, "num_active_params"):  # e.g. a mixture of experts: the parameters one token uses
        active = model.num_active_params()
    else:  # embedding tables are looked up, not multiplied
        active = total - sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    counter = FlopCounterMode(display=False)
    with counter:
        model(idx, idx).backward()
    return total, active, counter.get_total_flops() / args.seq_len


def bench_script(path, flags, steps, workdir):
    """Run the script's main() for `steps` steps on synthetic shards; return one row of the table."""
    module = import_script(path)
    args, _ = module.parse_args(flags)
    n_train = (steps + 1) * args.batch_tokens + args.seq_len + 1  # the compile warm-up rewinds the loader
    shard_dir = Path(workdir) / path.stem
    shard_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    fineweb.write_shard(str(shard_dir / "bench_train_000001.bin"), rng.integers(0, 50257, n_train))
    fineweb.write_shard(str(shard_dir / "bench_val_000000.bin"), rng.integers(0, 50257, args.seq_len + 1))
    with contextlib.redirect_stdout(sys.stderr):  # the script's own step lines: progress, not results
        summary = module.main(flags + [f"--train_files={shard_dir / 'bench_train_*.bin'}",
                                       f"--val_files={shard_dir / 'bench_val_*.bin'}", f"--num_iterations={steps}",
                                       "--val_every=0", f"--val_tokens={args.seq_len}", f"--log_dir={shard_dir}"])
    total, active, flops_per_token = model_costs(module, args)
    tokens_per_s = summary["tokens_seen"] / summary["train_time_s"]
    peak = peak_tflops(summary["device"])
    return dict(script=path.name, params_m=total / 1e6, active_params_m=active / 1e6, tokens_per_s=tokens_per_s,
                ms_per_step=1000 * summary["train_time_s"] / summary["steps"],
                gflops_per_token=flops_per_token / 1e9,
                mfu=flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
                peak_mem_gb=summary["peak_mem_gb"], compile_s=summary["compile_warmup_s"], device=summary["device"],
                world_size=summary["world_size"], batch_tokens=args.batch_tokens, seq_len=args.seq_len)


def format_table(rows):
    head = "| script | params (total/active) | tokens/s | ms/step | GFLOP/token | MFU | peak mem | compile |"
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        compile_s = f"{r['compile_s']:.0f} s" if r["compile_s"] is not None else "off"
        lines.append(f"| {r['script']} | {r['params_m']:.1f}M / {r['active_params_m']:.1f}M | "
                     f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['gflops_per_token']:.3f} | {mfu} | "
                     f"{r['peak_mem_gb']:.2f} GB | {compile_s} |")
    return "\n".join(lines)


def race(scripts, flags, minutes, name, out_root, command):
    """Train every script for the same training time on the same data; write the logs, a table and a plot to
    records/proxy/<date>_<name>/ and refresh records/README.md."""
    folder = Path(out_root) / "proxy" / f"{datetime.date.today():%Y-%m-%d}_{name}"
    if folder.exists():
        raise SystemExit(f"error: {folder} exists; records are never overwritten: choose another --name")
    folder.mkdir(parents=True)
    summaries = []
    for script in scripts:
        module = import_script(script)
        summaries.append(module.main(flags + [f"--time_budget_s={60 * minutes}", "--num_iterations=1000000",
                                              f"--log_dir={folder}"]))
        del module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logs = [folder / f"{s['run_id']}.txt" for s in summaries]
    lines = ["| script | steps | tokens | final val loss | best val loss | tokens/s | peak mem |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['script']} | {s['steps']} | {s['tokens_seen']:,} | {s['final_val_loss']:.4f} | "
                     f"{s['best_val_loss']:.4f} | {s['tokens_seen'] / s['train_time_s']:,.0f} | "
                     f"{s['peak_mem_gb']:.2f} GB |")
    plot = ""
    try:
        baseline = next((log for log, s in zip(logs, summaries) if s["script"] == "train_gpt2.py"), None)
        leaderboard.plot_runs(logs, folder / "plot.png", baseline=baseline, x="both")
        plot = "\n![val loss vs training time and tokens](plot.png)\n"
    except RuntimeError as e:  # matplotlib is optional
        print(f"no plot: {e}", file=sys.stderr)
    (folder / "README.md").write_text(
        f"# Proxy race: {name}\n\nEvery script trained for {minutes:g} min of training time (validation excluded) on "
        f"the same data with the same settings, on {summaries[0]['device']} x{summaries[0]['world_size']}, torch "
        f"{torch.__version__}. Proxy data: a speed and loss-vs-tokens comparison, never a FineWeb result.\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + "\n" + plot, encoding="utf-8")
    leaderboard.write_readme(Path(out_root))
    print("\n".join(lines) + f"\n\nwritten to {folder}")
    return summaries


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=None, help="train scripts (default: every train_gpt2*.py)")
    p.add_argument("--preset", default="gpt2_124m", help="the scripts' --preset")
    p.add_argument("--seq_len", type=int, help="override the preset's sequence length")
    p.add_argument("--device_batch_size", help="sequences per micro-step, or auto")
    p.add_argument("--batch_tokens", type=int, help="tokens per optimizer step (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per script")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="more flags for every script")
    p.add_argument("--json", action="store_true", help="print one JSON object per script instead of the table")
    race_args = p.add_argument_group("race: equal training time for every script, into records/proxy/")
    race_args.add_argument("--race", action="store_true", help="run the race instead of the throughput table")
    race_args.add_argument("--minutes", type=float, default=5.0, help="training minutes per script")
    race_args.add_argument("--train_files", help="training shards (glob)")
    race_args.add_argument("--val_files", help="validation shards (glob)")
    race_args.add_argument("--val_every", type=int, default=50, help="validation every N steps")
    race_args.add_argument("--val_tokens", type=int, default=1048576, help="validation tokens")
    race_args.add_argument("--name", default="Race", help="the record folder's short name")
    race_args.add_argument("--records", default=str(ROOT / "records"), help="the records tree")
    a = p.parse_args(argv)
    scripts = [Path(s) for s in a.scripts] if a.scripts else sorted(ROOT.glob("train_gpt2*.py"))
    flags = [f"--preset={a.preset}"] + [f"--{k}={v}" for k, v in (("seq_len", a.seq_len),
             ("device_batch_size", a.device_batch_size), ("batch_tokens", a.batch_tokens)) if v is not None]
    flags += [f"--{kv}" for kv in a.set]
    if a.race:
        if not (a.train_files and a.val_files):
            p.error("--race needs --train_files and --val_files (e.g. the proxy shards, see README)")
        flags += [f"--train_files={a.train_files}", f"--val_files={a.val_files}", f"--val_every={a.val_every}",
                  f"--val_tokens={a.val_tokens}"]
        command = shlex.join(["python", "bench.py"] + list(sys.argv[1:] if argv is None else argv))
        return race(scripts, flags, a.minutes, a.name, a.records, command)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for script in scripts:
            rows.append(bench_script(script, flags, a.steps, workdir))
    if a.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"\n{rows[0]['device']} x{rows[0]['world_size']}, torch {torch.__version__}, {a.preset} preset, "
              f"{rows[0]['batch_tokens']} tokens/step, seq_len {rows[0]['seq_len']}, {a.steps} steps; "
              f"flags: {' '.join(flags)}\n")
        print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
