"""Shared benchmark helpers: timing (median after warm-up), the copy bandwidth of this machine
measured in the same run, an aligned table, the final JSON line, and answers generated in batches."""

import argparse
import json
import platform
import statistics
import time

import torch


# glibc's largest mmap threshold: a block of this size or more is fresh pages on every allocation, and
# faulting them in (the kernel zeroes each page) runs at a few GB/s; an op returning such a tensor
# is bound by that, whatever its kernel does.
FRESH_BYTES = 32 << 20


def median_time(fn, warmup: int = 3, reps: int = 20, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds (CUDA-synchronised when a GPU is used)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * reps:
            break
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 256 << 20, device: str = "cpu") -> float:
    """GB/s of dst.copy_(src) for a buffer past the caches, counting bytes read + written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), warmup=2, reps=10)
    return 2 * nbytes / t / 1e9


def op_arguments(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments every op benchmark takes: --device (the GPU when there is one), --dtype, --threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    return ap


def op_setup(args) -> tuple:
    """Applies --threads; returns (device, dtype, the copy bandwidth measured now in GB/s)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return args.device, getattr(torch, args.dtype), copy_bandwidth(device=args.device)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format); a value of None prints as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r[k] is None else format(r[k], f) if f else str(r[k]) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def emit_json(payload: dict):
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(payload, sort_keys=True))


def batched_answers(model, texts, exit_layer, shortlist, batch: int = 16, **generate_kw) -> list:
    """GenerationOutputs of `texts` at exit_layer with the head `shortlist` (generate's option), in
    batches of `batch`, without a calibration (costs from the parameters)."""
    import balcony_ext as bx

    out = []
    for i in range(0, len(texts), batch):
        out += bx.generate(model, texts[i:i + batch], exit_layer=exit_layer, calibration=None, shortlist=shortlist,
                           **generate_kw)
    return out
