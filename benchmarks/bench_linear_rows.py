"""linear_rows microbenchmark: the decode step's matrix-vector products, per weight format, against
PyTorch's own linear on the same weights (CPU only: linear_rows is the CPU decode step's kernel).

    python benchmarks/bench_linear_rows.py --threads 1
    python benchmarks/bench_linear_rows.py --shapes 49152x576 1536x576 --rows 1 8

Weight formats: float32, bfloat16 (x rounded to bfloat16; vdpbf16ps on AVX512-BF16 CPUs), Q8 (int8
blocks of 32 with a float16 scale), Q4 (4-bit blocks of 32 with a float16 scale) and Q4_1 (4-bit blocks
with a float16 scale and minimum), x rounded to int16 per row for the block formats. PyTorch's F.linear
runs on float32 weights (for float32 and the block formats, whose dequantised matrices are float32) and on
bfloat16 weights with bfloat16 activations. The contenders alternate within every round (the machine
drifts between minutes); each figure is the best of the rounds' medians. GB/s counts the weight bytes read, beside the copy bandwidth measured first. On an
AVX512-BF16 CPU the bfloat16 weights also run with those instructions off ("x bf16 plain": the speed-up
of vdpbf16ps), alternating in the same rounds.
Prints a table, then one JSON line.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the source tree, when not installed
from common import emit_json, machine, median_time, op_arguments, op_setup, print_table  # noqa: E402

import balcony_ext as bx  # noqa: E402
from balcony_ext import ops  # noqa: E402

# SmolLM2-135M's matrices: q/o, k/v, gate/up, down, the LM head
DEFAULT_SHAPES = ["576x576", "192x576", "1536x576", "576x1536", "49152x576"]


def main():
    p = op_arguments(__doc__.splitlines()[0])
    p.set_defaults(device="cpu")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxK weight shapes (K a multiple of 32)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if args.device != "cpu":
        sys.exit("linear_rows is a CPU kernel: use --device cpu")
    _, _, copy_gbs = op_setup(args)
    insn = bx.cpu_capability() == "avx512bf16"

    def plain(fn):
        bx.set_cpu_capability("avx512")
        try:
            return fn()
        finally:
            bx.set_cpu_capability("avx512bf16")
    g = torch.Generator().manual_seed(0)
    results = []
    for shape in args.shapes:
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K, generator=g) * 0.05
        weights = {"float32": w, "bfloat16": w.bfloat16(), "q8": ops.quantize_q8(w), "q4": ops.quantize_q4(w),
                   "q4_1": ops.quantize_q4_1(w)}
        dequantised = {f: ops.weight_matrix(weights[f]) for f in ("q8", "q4", "q4_1")}
        for M in args.rows:
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            contenders = {f"ours {f}": (lambda wf=wf: ops.linear_rows(x, wf)) for f, wf in weights.items()}
            if insn:  # the same kernel with the AVX512-BF16 instructions off, alternating in the same rounds
                contenders["ours bfloat16 plain"] = lambda: plain(lambda: ops.linear_rows(x, weights["bfloat16"]))
            contenders["torch float32"] = lambda: F.linear(x, w)
            contenders["torch bfloat16"] = lambda: F.linear(xb, weights["bfloat16"])
            for f, wd in dequantised.items():
                contenders[f"torch {f} (dequantised, float32)"] = lambda wd=wd: F.linear(x, wd)
            best = {k: float("inf") for k in contenders}
            reps = max(5, min(200, int(3e7 / (N * K))))
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    best[name] = min(best[name], median_time(fn, warmup=2, reps=reps))
            nbytes = {f: wf.numel() * wf.element_size() for f, wf in weights.items()}
            for f in weights:
                ref = {"float32": "torch float32", "bfloat16": "torch bfloat16"}.get(
                    f, f"torch {f} (dequantised, float32)")
                t = best[f"ours {f}"]
                results.append(dict(shape=shape, rows=M, format=f, us=t * 1e6, gbs=nbytes[f] / t / 1e9,
                                    of_copy=nbytes[f] / t / 1e9 / copy_gbs, torch_us=best[ref] * 1e6,
                                    vs_torch=best[ref] / t, vs_bf16=best["ours bfloat16"] / t,
                                    vs_plain=best["ours bfloat16 plain"] / t if insn and f == "bfloat16" else None))
    print(f"# linear_rows, {machine()}, CPU kernels {bx.cpu_capability()}; copy bandwidth {copy_gbs:.1f} GB/s")
    print_table(results, [("shape", "N x K", ""), ("rows", "rows", "d"), ("format", "weights", ""),
                          ("us", "us", ".1f"), ("gbs", "GB/s read", ".1f"), ("of_copy", "x copy", ".2f"),
                          ("torch_us", "torch us", ".1f"), ("vs_torch", "x torch", ".2f"),
                          ("vs_bf16", "x ours bf16", ".2f")]
                + ([("vs_plain", "x bf16 plain", ".2f")] if insn else []))
    emit_json(dict(benchmark="linear_rows", machine=machine(), cpu=bx.cpu_capability(), copy_gbs=copy_gbs,
                   rows=results))


if __name__ == "__main__":
    main()
