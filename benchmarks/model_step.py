"""Time and peak memory of one full PCCNet phase-2 training step, and color_distribution vs a naive reference.

    python benchmarks/model_step.py [--quick] [--device cuda] [--bf16] [--width 64]

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


def _make_step(image_size: int, batch_size: int, width: int, device: str, bf16: bool):
    import torch
    from accelerate import Accelerator

    from pccnet.config import DiscriminatorConfig, GeneratorConfig, SamplerConfig
    from pccnet.discriminator import PatchDiscriminator
    from trainer.config import LossConfig, Phase1Config
    from trainer.models import build_generator
    from trainer.step import StepContext, gan_step

    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no")
    loss = LossConfig()
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(width=width), SamplerConfig())
    disc = PatchDiscriminator(DiscriminatorConfig(width=min(64, max(8, 2 * width))))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gen, disc, opt_g, opt_d = acc.prepare(gen, disc, opt_g, opt_d)
    ctx = StepContext(accelerator=acc, loss=loss, phase1=Phase1Config(), use_memory=True, world_size=1, seed=0)
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
                 reps: int = 3, warmup: int = 1) -> dict:
    """Median seconds per step and images/s in this process."""
    import torch

    step, dev = _make_step(image_size, batch_size, width, device, bf16)
    for _ in range(warmup):
        step()
    flops = count_flops(step) if dev.type == "cuda" else None
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
           "step_s": sec, "images_per_s": batch_size / sec}
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["tflops"] = flops / sec / 1e12
        peak = gpu_peak(bf16)
        out["peak_share"] = out["tflops"] / peak if peak else None
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


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


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
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
    parser.add_argument("--child", nargs=6, metavar=("SIZE", "BATCH", "WIDTH", "DEVICE", "BF16", "REPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        size, batch, width, device, bf16, reps = args.child
        print(json.dumps(measure_step(int(size), int(batch), int(width), device, bf16 == "1", reps=int(reps))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([64, 128] if args.quick else [64, 128, 256])
    reps = 2 if args.quick else 3
    rows = []
    for precision in ([False, True] if args.bf16 else [False]):
        for size in sizes:
            for batch in [int(b) for b in args.batches.split(",")]:
                rows.append(_run_child([str(size), str(batch), str(args.width), args.device,
                                        "1" if precision else "0", str(reps)]))
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
    cd = color_distribution_ratio(256, 4 if not args.quick else 2, 3 if not args.quick else 2)
    print("\ncolor_distribution at 256x256 (images / s, one process)")
    print("| vectorised (cell candidates) | naive [pixels, 313] reference | ratio |")
    print("| ---: | ---: | ---: |")
    print(f"| {cd['vectorised']:.1f} | {cd['naive']:.1f} | {cd['ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": rows, "color_distribution": cd}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
