"""Time and peak memory of each kernel vs its PyTorch reference vs torch.compile(reference).

    python kernels/bench.py [--device cuda] [--tokens N --vocab V --dim C] [--softcap 15]
                            [--offset 0 --width W]  (the CE head: softcap * tanh((z + offset) / W))
                            [--xxt-shapes 768x768,12x768x3072] [--no-compile] [--warmup 3 --reps 10]

Defaults are the 124M preset's head (16*1024 tokens, C=768, V=50304, bf16 autocast) and Muon's
Newton-Schulz shapes. Times are medians over --reps runs after --warmup runs (CUDA events on GPU);
peak memory is torch.cuda.max_memory_allocated during the runs minus what was allocated before
(inputs and weights), so it shows what each variant adds. On CPU, Triton rows run only under
TRITON_INTERPRET=1 (and then measure the interpreter, not a kernel) and memory is not measured.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import kernels` resolve to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kernels import cross_entropy as ce  # noqa: E402
from kernels import newton_schulz as ns  # noqa: E402
from kernels._dispatch import use_triton  # noqa: E402

MUON_SHAPES = "768x768,768x3072,3072x768,12x768x768,12x768x3072,12x3072x768"


def measure(fn, device, warmup, reps):
    """Median milliseconds and peak extra MiB (CUDA only, else None) of fn()."""
    is_cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if is_cuda else None
    return statistics.median(times), peak


def _variants(triton_fn, reference_fn, device, compile_reference):
    """(name, fn or None-with-reason) for the three variants of one kernel."""
    if use_triton(torch.empty(0, device=device)):
        yield "triton", triton_fn
    else:
        yield "triton", "skipped (no CUDA or no triton)"
    yield "reference", reference_fn
    if compile_reference:
        yield "compiled reference", torch.compile(reference_fn)
    else:
        yield "compiled reference", "skipped: --no-compile"


def _parse_shape(text):
    dims = tuple(int(d) for d in text.lower().split("x"))
    if len(dims) not in (2, 3):
        raise argparse.ArgumentTypeError(f"xxt shape must be MxN or BxMxN, got {text!r}")
    return dims


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16 * 1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--softcap", type=float, default=15.0)
    parser.add_argument("--offset", type=float, default=0.0,
                        help="CE head softcap * tanh((z + offset) / width)")
    parser.add_argument("--width", type=float, default=None, help="default: the softcap")
    parser.add_argument("--xxt-shapes", default=MUON_SHAPES)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    # What training runs: bf16 on GPU (autocast for the head matmul); fp32 on CPU.
    low_dtype = torch.bfloat16 if is_cuda else torch.float32
    torch.manual_seed(0)
    n, c, v = args.tokens, args.dim, args.vocab
    rows = []
    head = {"offset": args.offset, "width": args.width}

    def run_case(label, triton_fn, reference_fn):
        for name, fn in _variants(triton_fn, reference_fn, device, not args.no_compile):
            if isinstance(fn, str):
                rows.append((label, name, fn, ""))
                continue
            ms, mib = measure(fn, device, args.warmup, args.reps)
            rows.append((label, name, f"{ms:.3f}", "n/a" if mib is None else f"{mib:.0f}"))

    # Fused head + softcapped CE, forward and backward, as in training.
    x = torch.randn(n, c, device=device, requires_grad=True)
    weight = (torch.randn(v, c, device=device) * c**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)

    def linear_ce_step(loss_fn):
        def step():
            x.grad = weight.grad = None
            with torch.autocast(device.type, dtype=low_dtype, enabled=is_cuda):
                loss = loss_fn(x, weight, targets, args.softcap, **head)
            loss.backward()
        return step

    run_case(f"linear+softcap CE fwd+bwd  N={n} C={c} V={v}",
             linear_ce_step(ce.linear_softcap_cross_entropy_triton),
             linear_ce_step(ce.linear_softcap_cross_entropy_reference))
    del x, weight

    # Softcapped CE from given logits, forward and backward.
    logits = (torch.randn(n, v, device=device) * 4).to(low_dtype).requires_grad_()

    def softcap_ce_step(loss_fn):
        def step():
            logits.grad = None
            loss_fn(logits, targets, args.softcap, **head).backward()
        return step

    run_case(f"softcap CE fwd+bwd  logits {n}x{v} {str(low_dtype).split('.')[-1]}",
             softcap_ce_step(ce.softcap_cross_entropy_triton),
             softcap_ce_step(ce.softcap_cross_entropy_reference))
    del logits

    # X @ X.mT at Muon's shapes.
    for shape in (_parse_shape(s) for s in args.xxt_shapes.split(",") if s):
        a = torch.randn(shape, device=device).to(low_dtype)
        run_case(f"xxt {'x'.join(map(str, shape))} {str(low_dtype).split('.')[-1]}",
                 lambda a=a: ns.xxt_triton(a), lambda a=a: ns.xxt_reference(a))

    name = torch.cuda.get_device_name(device) if is_cuda else "cpu"
    print(f"device: {name}  torch {torch.__version__}  warmup {args.warmup}  reps {args.reps}")
    widths = [max(len(r[i]) for r in rows + [("kernel", "variant", "ms", "peak MiB")])
              for i in range(4)]
    for row in [("kernel", "variant", "ms", "peak MiB")] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return rows


if __name__ == "__main__":
    main()
