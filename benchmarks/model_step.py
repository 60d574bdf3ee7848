"""Time and peak memory of one full PCCNet phase-2 training step, and color_distribution vs a naive reference.

    python benchmarks/model_step.py [--quick] [--device cuda] [--bf16] [--width 64]
    python benchmarks/model_step.py --options default,channels_last,fused,compile --sizes 256 --batches 4
    python benchmarks/model_step.py --profile --sizes 256 --batches 4   # torch.profiler: the top ops

`--options` measures the `train` config section's options (trainer.speed; `+` combines them, e.g.
`channels_last+fused`) at each size and batch, as images/s and the ratio to `default` in the same
run; FLOPs of a step are counted once per size and batch (torch's FlopCounterMode: convolutions and
matmuls) so that a GPU run reports TFLOP/s and the share of the dense bf16 / TF32 peak.

A step is exactly the trainer's `gan_step`: G forward, D step, encoder passes for the sampler,
L_PC + L_IC + Huber + LSGAN, backward and both optimiser steps. Each (size, batch) point runs in a
fresh subprocess so its peak memory (max RSS on the CPU, max allocated on CUDA) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path and its trainer.py would shadow the trainer package.
sys.path.insert(0, str(REPO))


OPTIONS = {"default": {}, "channels_last": {"channels_last": True}, "foreach": {"optimizer": "foreach"},
           "fused": {"optimizer": "fused"}, "for_loop": {"optimizer": "for_loop"}, "compile": {"compile": True},
           "cuda_graphs": {"cuda_graphs": True}}


def speed_config(option: str):
    """The SpeedConfig of an option name ('default', 'fused', 'channels_last+fused', ...)."""
    from trainer.config import SpeedConfig

    fields: dict = {}
    for part in option.split("+"):
        if part not in OPTIONS:
            raise SystemExit(f"unknown option {part!r}; choose from {sorted(OPTIONS)} (joined with '+')")
        fields.update(OPTIONS[part])
    return SpeedConfig(**fields)


def _make_step(image_size: int, batch_size: int, width: int, device: str, bf16: bool, option: str = "default"):
    import torch
    from accelerate import Accelerator

    from pccnet.config import DiscriminatorConfig, GeneratorConfig, SamplerConfig
    from pccnet.discriminator import PatchDiscriminator
    from trainer import speed
    from trainer.config import LossConfig, Phase1Config
    from trainer.models import build_generator
    from trainer.step import StepContext, gan_step

    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no")
    loss = LossConfig()
    opts = speed_config(option)
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(width=width), SamplerConfig()).to(acc.device)
    disc = PatchDiscriminator(DiscriminatorConfig(width=min(64, max(8, 2 * width)))).to(acc.device)
    speed.prepare_modules(opts, acc.device, gen, disc)  # as trainer.loop does
    adam = speed.adam_options(opts, acc.device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999), **adam)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999), **adam)
    gen, disc, opt_g, opt_d = acc.prepare(gen, disc, opt_g, opt_d)
    ctx = StepContext(accelerator=acc, loss=loss, phase1=Phase1Config(), use_memory=True, world_size=1, seed=0,
                      channels_last=opts.channels_last)
    dev = acc.device
    g = torch.Generator().manual_seed(0)
    light = torch.rand(batch_size, 1, image_size, image_size, generator=g).to(dev) * 2 - 1
    ab = (torch.rand(batch_size, 2, image_size, image_size, generator=g).to(dev) - 0.5) * 0.6
    c = torch.softmax(torch.randn(batch_size, 313, generator=g), 1).to(dev)
    batch = {"light": light, "ab": ab, "color_feature": c}
    patch_rng = torch.Generator().manual_seed(1)

    def step():
        gan_step(ctx, gen, disc, opt_g, opt_d, batch, patch_rng)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step, dev


# Dense tensor-core peaks in TFLOP/s (NVIDIA datasheets): fp32 convolutions run as TF32 by default.
PEAKS_TFLOPS = {"H100 80GB HBM3": {"tf32": 494.7, "bf16": 989.4}, "H100 PCIe": {"tf32": 378.0, "bf16": 756.0},
                "H200": {"tf32": 494.7, "bf16": 989.4}}


def gpu_peak(bf16: bool) -> float | None:
    import torch

    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS_TFLOPS.items():
        if key in name:
            return peaks["bf16" if bf16 else "tf32"]
    return None


def count_flops(step) -> int:
    """FLOPs of one step as counted by torch's FlopCounterMode (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def measure_step(image_size: int, batch_size: int, width: int, device: str = "cpu", bf16: bool = False,
                 reps: int = 3, warmup: int = 1, option: str = "default", flops: bool | None = None) -> dict:
    """Median seconds per step and images/s in this process (FLOPs counted when `flops`, by default
    for the default option only: the others compute the same step)."""
    import torch

    step, dev = _make_step(image_size, batch_size, width, device, bf16, option)
    t0 = time.perf_counter()
    for _ in range(warmup if "compile" not in option and "cuda_graphs" not in option else max(warmup, 3)):
        step()
    warmup_s = time.perf_counter() - t0  # compile and CUDA graph capture happen here
    flops = count_flops(step) if (option == "default" if flops is None else flops) else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    sec = times[len(times) // 2]
    out = {"size": image_size, "batch": batch_size, "width": width, "device": str(dev), "bf16": bf16,
           "option": option, "step_s": sec, "images_per_s": batch_size / sec, "warmup_s": warmup_s, "flops": flops}
    add_flop_rates(out)
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def add_flop_rates(row: dict) -> None:
    """TFLOP/s of a row with a FLOP count, and its share of this GPU's dense peak (bf16, or TF32 for fp32)."""
    if not row.get("flops"):
        return
    row["tflops"] = row["flops"] / row["step_s"] / 1e12
    if row["device"].startswith("cuda"):
        peak = gpu_peak(row["bf16"])
        row["peak_share"] = row["tflops"] / peak if peak else None


def profile_step(image_size: int, batch_size: int, width: int, device: str, bf16: bool, option: str = "default",
                 top: int = 15, trace: str | None = None) -> str:
    """torch.profiler over one step after a warm-up: the top ops by self time, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    step, dev = _make_step(image_size, batch_size, width, device, bf16, option)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        step()
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    on_gpu = dev.type == "cuda"

    def self_us(e) -> float:
        return (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if on_gpu \
            else e.self_cpu_time_total

    total = sum(self_us(e) for e in events) or 1.0
    lines = [f"| op | calls | self {'GPU' if on_gpu else 'CPU'} ms | share |", "| --- | ---: | ---: | ---: |"]
    for e in sorted(events, key=self_us, reverse=True)[:top]:
        lines.append(f"| `{e.key}` | {e.count} | {self_us(e) / 1000:.1f} | {self_us(e) / total:.1%} |")
    return "\n".join(lines) + f"\n\ntotal self time {total / 1000:.1f} ms in one step"


def phase2_images_per_second(image_size: int, batch_size: int, width: int) -> float:
    """Training consumption rate of the phase-2 step on this machine's CPU (for the data benchmark)."""
    return measure_step(image_size, batch_size, width, "cpu", reps=3)["images_per_s"]


def color_distribution_ratio(size: int = 256, batch: int = 4, reps: int = 3) -> dict:
    """Throughput of pccnet.color.color_distribution against a brute-force [pixels, 313] reference."""
    import torch

    from pccnet.color import AB_BINS, NUM_BINS, color_distribution, rgb_to_lab

    def naive(ab):
        pix = ab.permute(0, 2, 3, 1).reshape(-1, 2)
        d2 = torch.cdist(pix, AB_BINS.float()).square()
        dk, idx = d2.topk(10, dim=1, largest=False)
        w = torch.exp(-dk / 50.0)
        w = w / w.sum(1, keepdim=True)
        n = pix.shape[0] // ab.shape[0]
        rows = torch.arange(ab.shape[0]).repeat_interleave(n)
        hist = torch.zeros(ab.shape[0] * NUM_BINS)
        hist.index_add_(0, (rows[:, None] * NUM_BINS + idx).reshape(-1), w.reshape(-1))
        return hist.view(ab.shape[0], NUM_BINS) / n

    ab = rgb_to_lab(torch.rand(batch, 3, size, size))[:, 1:]
    result = {}
    for name, fn in (("vectorised", color_distribution), ("naive", naive)):
        fn(ab)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(ab)
        result[name] = batch * reps / (time.perf_counter() - t0)
    assert torch.allclose(color_distribution(ab), naive(ab), atol=1e-5)
    result["ratio"] = result["vectorised"] / result["naive"]
    return result


def _run_child(args: list[str], tolerate: bool = False) -> dict | None:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        if tolerate:  # an option or batch this device cannot run (out of memory, no compiler): noted, not fatal
            reason = "out of memory" if "out of memory" in out.stderr.lower() else out.stderr.strip().splitlines()[-1:]
            print(f"  child {args} failed: {reason}", file=sys.stderr)
            return {"failed": str(reason)[:200]}
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 and 128 px only, fewer repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also run with bf16 autocast (losses stay fp32)")
    parser.add_argument("--width", type=int, default=64, help="generator width (the paper's: 64)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (default 64,128,256)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--options", default=None,
                        help=f"train-section options to compare with 'default' (from {sorted(OPTIONS)}, "
                             "comma-separated; '+' combines)")
    parser.add_argument("--sweep", default=None,
                        help="batch sizes to sweep with the fastest option (after --options); stops at the first "
                             "that fails (out of memory)")
    parser.add_argument("--profile", action="store_true", help="profile one step per size and batch; no timing table")
    parser.add_argument("--trace", default=None, help="with --profile: write a Chrome trace here")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-color-distribution", action="store_true")
    parser.add_argument("--child", nargs=7, metavar=("SIZE", "BATCH", "WIDTH", "DEVICE", "BF16", "REPS", "OPTION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        size, batch, width, device, bf16, reps, option = args.child
        print(json.dumps(measure_step(int(size), int(batch), int(width), device, bf16 == "1", reps=int(reps),
                                      option=option)))
        return 0
    if args.options or args.sweep:
        return options_main(args)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([64, 128] if args.quick else [64, 128, 256])
    reps = args.reps or (2 if args.quick else 3)
    if args.profile:
        for size in sizes:
            for batch in [int(b) for b in args.batches.split(",")]:
                print(f"\ntorch.profiler, one phase-2 step at {size} px, batch {batch}, width {args.width}, "
                      f"{args.device}{' bf16' if args.bf16 else ''}")
                print(profile_step(size, batch, args.width, args.device, args.bf16, trace=args.trace))
        return 0
    rows = []
    for precision in ([False, True] if args.bf16 else [False]):
        for size in sizes:
            for batch in [int(b) for b in args.batches.split(",")]:
                rows.append(_run_child([str(size), str(batch), str(args.width), args.device,
                                        "1" if precision else "0", str(reps), "default"]))
                r = rows[-1]
                print(f"  measured {size}px batch {batch} {'bf16' if precision else 'fp32'}: "
                      f"{r['step_s'] * 1000:.1f} ms", file=sys.stderr)
    print(f"\nPhase-2 training step (gan_step), generator width {args.width}, device {args.device}")
    if rows and "gpu" in rows[0]:
        print(f"GPU: {rows[0]['gpu']}; share of the dense tensor-core peak (fp32 runs as TF32)")
    print("| size | batch | precision | ms / step | images / s | peak memory (MiB) | TFLOP/s | share of peak |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tf = f"{r['tflops']:.1f}" if r.get("tflops") is not None else "n/a"
        share = f"{r['peak_share']:.1%}" if r.get("peak_share") is not None else "n/a"
        print(f"| {r['size']} | {r['batch']} | {'bf16' if r['bf16'] else 'fp32'} | {r['step_s'] * 1000:.1f} | "
              f"{r['images_per_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} | {tf} | {share} |")
    if args.no_color_distribution:
        if args.json:
            Path(args.json).write_text(json.dumps({"steps": rows}, indent=2))
        return 0
    cd = color_distribution_ratio(256, 4 if not args.quick else 2, 3 if not args.quick else 2)
    print("\ncolor_distribution at 256x256 (images / s, one process)")
    print("| vectorised (cell candidates) | naive [pixels, 313] reference | ratio |")
    print("| ---: | ---: | ---: |")
    print(f"| {cd['vectorised']:.1f} | {cd['naive']:.1f} | {cd['ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": rows, "color_distribution": cd}, indent=2))
    return 0


def _fmt_flops(r: dict) -> tuple[str, str]:
    tf = f"{r['tflops']:.2f}" if r.get("tflops") is not None else "n/a"
    share = f"{r['peak_share']:.1%}" if r.get("peak_share") is not None else "n/a (no GPU)"
    return tf, share


def options_main(args) -> int:
    """Each option at each size and batch, interleaved per repeat, as a ratio to 'default'; then the batch sweep."""
    options = ["default"] + [o for o in (args.options or "").split(",") if o and o != "default"]
    for option in options:
        speed_config(option)  # an unknown name fails before anything runs
    sizes = [int(s) for s in (args.sizes or "256").split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    reps = args.reps or (2 if args.quick else 3)
    precision = "1" if args.bf16 else "0"
    rows = []
    for size in sizes:
        for batch in batches:
            point = {}
            for option in options:
                r = _run_child([str(size), str(batch), str(args.width), args.device, precision, str(reps), option],
                               tolerate=option != "default")
                r.update(size=size, batch=batch, option=option)
                point[option] = r
                print(f"  {size}px batch {batch} {option}: "
                      f"{r.get('images_per_s', float('nan')):.2f} img/s", file=sys.stderr)
            for r in point.values():  # one FLOP count per point: every option computes the same step
                if "failed" not in r:
                    r["flops"] = point["default"]["flops"]
                    add_flop_rates(r)
                    r["ratio"] = r["images_per_s"] / point["default"]["images_per_s"]
            rows.extend(point.values())
    prec = "bf16 autocast" if args.bf16 else "fp32"
    print(f"\nPhase-2 step options (train section), generator width {args.width}, {args.device}, {prec}; "
          f"median of {reps} steps each, ratio to 'default' in this run")
    if any("gpu" in r for r in rows):
        print(f"GPU: {next(r['gpu'] for r in rows if 'gpu' in r)}; share of the dense "
              f"{'bf16' if args.bf16 else 'TF32'} tensor-core peak")
    print("| size | batch | option | ms / step | images / s | ratio | GFLOP / step | TFLOP/s | share of peak | "
          "warm-up s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "failed" in r:
            print(f"| {r['size']} | {r['batch']} | {r['option']} | failed: {r['failed']} | | | | | | |")
            continue
        tf, share = _fmt_flops(r)
        gflop = f"{r['flops'] / 1e9:.1f}" if r.get("flops") else "n/a"
        print(f"| {r['size']} | {r['batch']} | {r['option']} | {r['step_s'] * 1000:.1f} | {r['images_per_s']:.2f} | "
              f"{r['ratio']:.2f}x | {gflop} | {tf} | {share} | {r['warmup_s']:.1f} |")
    sweep_rows = []
    if args.sweep:
        ok = [r for r in rows if "failed" not in r]
        best = max(ok, key=lambda r: r["ratio"])["option"] if ok else "default"
        size = sizes[-1]
        for batch in [int(b) for b in args.sweep.split(",")]:
            r = _run_child([str(size), str(batch), str(args.width), args.device, precision, str(reps), best],
                           tolerate=True)
            r.update(size=size, batch=batch, option=best)
            if "failed" in r:
                sweep_rows.append(r)
                break
            if not r.get("flops"):  # the best option skips the count; count it once for this batch
                r["flops"] = _run_child([str(size), str(batch), str(args.width), args.device, precision, "1",
                                         "default"])["flops"]
                add_flop_rates(r)
            sweep_rows.append(r)
            print(f"  sweep {size}px batch {batch} {best}: {r['images_per_s']:.2f} img/s", file=sys.stderr)
        print(f"\nPer-device batch sweep at {size} px with '{best}' ({prec})")
        print("| batch | images / s | peak memory (MiB) | TFLOP/s | share of peak |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for r in sweep_rows:
            if "failed" in r:
                print(f"| {r['batch']} | failed: {r['failed']} | | | |")
                continue
            tf, share = _fmt_flops(r)
            print(f"| {r['batch']} | {r['images_per_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} | {tf} | {share} |")
        done = [r for r in sweep_rows if "failed" not in r]
        if done:
            top = max(done, key=lambda r: r["images_per_s"])
            print(f"\nbest batch: {top['batch']} ({top['images_per_s']:.2f} images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": rows, "sweep": sweep_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
