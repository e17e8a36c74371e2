"""Decode speed of generate() at every exit and the full model, beside Hugging Face generate.

    PYTHONPATH=. python benchmarks/bench_generate.py [--exits-file F] [--batches 1 8]
        [--dtypes float32 bfloat16] [--weights float int8 q4 q4_1] [--prompt-len 64] [--tokens 32]
        [--gguf f32=model-f32.gguf q8_0=model-q8_0.gguf ...] [--no-shortlist]

For each dtype, weight format (float: the dtype's own; int8 / q4 / q4_1 blocks, balcony_ext.weights) and batch
size: decode tokens/s per sequence and time to first token for every exit and the full model (each with
the full head and, where the model has a vocabulary shortlist, the shortlisted head), Hugging
Face `generate` at the same depth and dtype (the first k base layers + the balcony layer: the same
weights), the weights' bytes read per step, the achieved GB/s against the read bandwidth measured in
the same run, and each exit's speed-up over our full model against the ideal ratio of bytes read.
Best of --repeats runs each. Table, then a JSON line.

--gguf adds llama.cpp (llama-cpp-python, built from source) at full depth on GGUF files of the same
weights (its converter, vendor/llama.cpp/convert_hf_to_gguf.py in the sdist; Q4_0 through
llama_cpp.llama_model_quantize), batch 1, the same prompt and threads, timed the same way (decode time of
--tokens tokens minus that of one), alternating with our full depth in every round.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import balcony_ext as bx  # noqa: E402
from balcony_ext.bench import decode_table, format_table, memory_bandwidth  # noqa: E402
from common import emit_json, machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits-file", default="bundled")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", nargs="+", default=["float"], choices=["float", "int8", "q4", "q4_1"],
                    help="weight formats (Hugging Face is timed beside the float rows only)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-shortlist", action="store_true", help="skip the routes with the shortlisted head")
    ap.add_argument("--gguf", nargs="*", default=[], metavar="NAME=PATH",
                    help="llama.cpp GGUF files to time at full depth, batch 1 (e.g. q8_0=smollm2-q8_0.gguf)")
    args = ap.parse_args()

    # this machine's memory bandwidth drifts by tens of % over minutes (shared host): it is measured
    # again right before each group of rows, and each row is set against its own group's figure
    rows, reads = [], []
    for dt in args.dtypes:
        for fmt in args.weights:
            model = bx.load(dtype=getattr(torch, dt), exits=args.exits_file, weights=fmt)
            for batch in args.batches:
                bw = memory_bandwidth()
                group = decode_table(model, batch=batch, prompt_len=args.prompt_len, new_tokens=args.tokens,
                                     hf=not args.no_hf and fmt == "float", repeats=args.repeats,
                                     shortlist=not args.no_shortlist)
                for r in group:
                    r["read_gbs"] = bw["read_gbs"]
                    r["of_read_bw"] = r["gbs"] / bw["read_gbs"]
                rows += group
                reads.append(f"{dt} {fmt} batch {batch}: {bw['read_gbs']:.1f}")
    if args.gguf:
        rows += llama_cpp_rows(args, dict(g.split("=", 1) for g in args.gguf))
    bw = dict(read_gbs=[r["read_gbs"] for r in rows if "read_gbs" in r])
    print(f"# generate decode speed, {model.name}, prompt {args.prompt_len} tokens, {args.tokens} new tokens, "
          f"{machine()}; read bandwidth measured before each group, GB/s: {', '.join(reads)}")
    print(format_table(rows))
    L = model.num_layers
    full_head = [r for r in rows if r.get("head", "full") == "full"]
    full = {(r["dtype"], r["batch"]): r for r in full_head if r["exit"] == L and r["weights"] == "float"}
    targets = {}
    f32 = full.get(("float32", 1))
    if f32 and "vs_hf" in f32:
        targets["full_fp32_b1_vs_hf (>=3)"] = f32["vs_hf"]
        targets["full_fp32_b1_of_read_bw (>=0.9)"] = f32["of_read_bw"]
    bf = full.get(("bfloat16", 1))
    if bf and "vs_hf" in bf:
        targets["full_bf16_b1_vs_hf (>=2)"] = bf["vs_hf"]
    for fmt in ("int8", "q4", "q4_1"):
        q = {r["dtype"]: r for r in full_head if r["exit"] == L and r["batch"] == 1 and r["weights"] == fmt}
        for dt, r in q.items():
            if (dt, 1) in full:
                targets[f"full_{fmt}_{dt}_b1_vs_float (>1)"] = r["tokens_per_s"] / full[(dt, 1)]["tokens_per_s"]
    exits = [r for r in rows if r["exit"] != L and r["batch"] == 1 and "of_ideal" in r]
    if exits:
        targets["min_exit_of_ideal_b1 (>=0.9)"] = min(r["of_ideal"] for r in exits)
    for r in rows:  # the shortlisted head at full depth: measured speed-up against the bytes it saves
        if r["exit"] == L and r.get("head", "full") != "full" and r["batch"] == 1 and "speedup_vs_full" in r:
            targets[f"full_{r['dtype']}_{r['weights']}_head{r['head']}_speedup (ideal {r['ideal_speedup']:.2f})"] = \
                r["speedup_vs_full"]
    with_hf = [r for r in rows if "hf_ttft_s" in r]
    if with_hf:
        targets["max_ttft_vs_hf (<=1)"] = max(r["ttft_s"] / r["hf_ttft_s"] for r in with_hf)
    peer = {r["dtype"]: r["tokens_per_s"] for r in rows if r["dtype"].startswith(("llama.cpp", "ours "))}
    for ours, theirs in (("ours float32 float", "llama.cpp f32"), ("ours bfloat16 float", "llama.cpp bf16"),
                         ("ours bfloat16 int8", "llama.cpp q8_0"), ("ours bfloat16 q4", "llama.cpp q4_0"),
                         ("ours bfloat16 q4_1", "llama.cpp q4_1")):
        if ours in peer and theirs in peer:
            fmt = ours.split()[2] if ours.split()[2] != "float" else ours.split()[1]
            targets[f"{fmt}_vs_{theirs} (>=1)"] = peer[ours] / peer[theirs]
    for k, v in targets.items():
        print(f"{k}: {v:.2f}")
    emit_json(dict(bench="generate", model=model.name, machine=machine(), bandwidth=bw, rows=rows, targets=targets))


def llama_cpp_rows(args, ggufs: dict) -> list:
    """llama.cpp at full depth, batch 1, beside our full depth in float32 / bfloat16 / int8 / q4 / q4_1,
    alternating within every round; best of --repeats."""
    import time

    from llama_cpp import Llama

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 10_000, (args.prompt_len,), generator=g).tolist()
    threads = torch.get_num_threads()
    llms = {name: Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
            for name, path in ggufs.items()}
    ours = {f"{dt} {fmt}": bx.load(dtype=getattr(torch, dt), exits=None, weights=fmt)
            for dt, fmt in (("float32", "float"), ("bfloat16", "float"), ("bfloat16", "int8"), ("bfloat16", "q4"),
                            ("bfloat16", "q4_1"))}

    def llama_time(llm, n):
        llm.reset()
        t = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
        dt = time.perf_counter() - t
        if out["usage"]["completion_tokens"] != n:
            raise RuntimeError("llama.cpp stopped early; use another prompt")
        return dt

    def our_time(m, n):
        out = bx.generate(m, prompt, max_new_tokens=n, stop_tokens=[], calibration=None)
        return out.tokens_per_second, out.time_to_first_token

    best = {k: 0.0 for k in list(llms) + list(ours)}
    for _ in range(args.repeats):
        for name, llm in llms.items():
            ttft = llama_time(llm, 1)
            best[name] = max(best[name], (args.tokens - 1) / max(llama_time(llm, args.tokens) - ttft, 1e-9))
        for name, m in ours.items():
            best[name] = max(best[name], our_time(m, args.tokens)[0])
    rows = []
    for name in llms:
        rows.append(dict(dtype=f"llama.cpp {name}", weights="gguf", batch=1, exit=ours["float32 float"].num_layers,
                         tokens_per_s=best[name]))
    for name, m in ours.items():
        rows.append(dict(dtype=f"ours {name}", weights=name.split()[1], batch=1, exit=m.num_layers,
                         tokens_per_s=best[name]))
    return rows


if __name__ == "__main__":
    main()
