"""Steered generation throughput, SmolLM2 on this machine (CPU unless a GPU is visible).

Three figures from one run, same prompts, batch and number of new tokens (EOS suppressed so
every run generates exactly the same number of tokens):
- plain HF ``generate`` on an HF model that no bridge has touched;
- the same backend unsteered (bridge: HF generate through the bridged modules);
- the same backend steered (``steer(..., positions="response")`` at one layer).
Repetitions are interleaved and the fastest kept (load from other processes only slows a run).
The issue's targets: steered >= 0.9x unsteered, and >= 0.5x plain HF.

    python benchmarks/bench_steering.py [--batch 16] [--new 32] [--reps 3] [--hooked] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM

from persona_lens import format_chat, load_model
from persona_lens.generation import left_pad
from persona_lens.models import smollm2_folder
from persona_lens.steering import resid_norms, steer
from persona_lens.traits import load_trait

RESULTS = Path(__file__).parent / "results"


def prompts(tok, n: int) -> list[list[int]]:
    qs = load_trait("evil").eval_questions
    return [format_chat(tok, qs[i % len(qs)]).prompt_ids for i in range(n)]


@torch.no_grad()
def hf_generate(hf, ids, mask, new: int, pad: int) -> None:
    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad)  # fmt: skip


@torch.no_grad()
def hooked_generate(model, ids, new: int) -> None:
    model.generate(ids, max_new_tokens=new, do_sample=False, stop_at_eos=False,
                   padding_side="left", prepend_bos=False, verbose=False,
                   return_type="tokens", use_past_kv_cache=True)  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--hooked", action="store_true", help="also time the HookedTransformer")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bridge = load_model("smollm2-135m", device=device)
    tok = bridge.tokenizer
    plain_hf = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=bridge.cfg.dtype)
    plain_hf = plain_hf.to(device).eval()
    ids, mask = left_pad(prompts(tok, args.batch), tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    # Any vector will do for timing; this one is 4% of the layer's typical residual norm.
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(bridge.cfg.n_layers + 1, bridge.cfg.d_model, generator=g)
    vec = vec / vec.norm(dim=-1, keepdim=True) * resid_norms(bridge)[:, None] * 0.04
    pad = tok.pad_token_id

    def run_steered(model, fn):
        with steer(model, vec, args.layer, coef=1.0, positions="response"):
            fn()

    bridge_hf = bridge.original_model
    jobs = {
        "hf_plain": lambda: hf_generate(plain_hf, ids, mask, args.new, pad),
        "bridge": lambda: hf_generate(bridge_hf, ids, mask, args.new, pad),
        "bridge_steered": lambda: run_steered(
            bridge, lambda: hf_generate(bridge_hf, ids, mask, args.new, pad)
        ),
    }
    if args.hooked:
        hooked = load_model("smollm2-135m", backend="hooked", device=device)
        jobs["hooked"] = lambda: hooked_generate(hooked, ids, args.new)
        jobs["hooked_steered"] = lambda: run_steered(
            hooked, lambda: hooked_generate(hooked, ids, args.new)
        )
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for k, fn in jobs.items():  # warm-up: first calls allocate buffers
        t = time.perf_counter()
        fn()
        print(f"warm-up {k}: {time.perf_counter() - t:.1f}s", flush=True)
    for rep in range(args.reps):
        order = list(jobs) if rep % 2 == 0 else list(reversed(jobs))  # interleaved
        for k in order:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            jobs[k]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    n_tokens = args.batch * args.new
    # Best of the reps: other processes only ever slow a run down, never speed it up.
    tps = {k: n_tokens / min(v) for k, v in times.items()}
    ratios = {
        "bridge_steered_vs_bridge": tps["bridge_steered"] / tps["bridge"],
        "bridge_steered_vs_hf_plain": tps["bridge_steered"] / tps["hf_plain"],
    }
    if args.hooked:
        ratios["hooked_steered_vs_hooked"] = tps["hooked_steered"] / tps["hooked"]
        ratios["hooked_steered_vs_hf_plain"] = tps["hooked_steered"] / tps["hf_plain"]
    name = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    res = {
        "machine": f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "model": bridge.cfg.model_name,
        "dtype": str(bridge.cfg.dtype),
        "batch": args.batch,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new,
        "steering": {"layer": args.layer, "positions": "response"},
        "reps": args.reps,
        "seconds": times,
        "tokens_per_s": tps,
        "ratios": ratios,
        "targets": {"steered_vs_unsteered": 0.9, "steered_vs_hf_plain": 0.5},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "steering.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"tokens_per_s": tps, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
