"""Activation extraction throughput and memory, SmolLM2 on this machine's CPU.

Ratios against baselines measured in the same run:
- the public release's way: HF fp32, one sample at a time, output_hidden_states;
- a plain batched HF forward with output_hidden_states at the same batch size.
Peak memory of mean_activations is measured in fresh processes for growing sample counts.

    python benchmarks/bench_activations.py [--n 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from persona_lens import format_chat, load_model
from persona_lens.activations import pooled_activations
from persona_lens.traits import load_trait

RESULTS = Path(__file__).parent / "results"


def conversations(tok, n: int):
    trait = load_trait("evil")
    qs = trait.extract_questions
    words = "the assistant answers this question with a calm and careful reply that goes on".split()
    out = []
    for i in range(n):
        answer = " ".join(words[j % len(words)] for j in range(24 + (i * 7) % 48))
        out.append(
            format_chat(
                tok, qs[i % len(qs)], system=trait.system_prompt("pos", i % 5), answer=answer
            )
        )
    return out


@torch.no_grad()
def release_way(hf, convs):
    """One conversation at a time, all hidden states, mean over response tokens."""
    for c in convs:
        hs = hf(torch.tensor([c.ids]), output_hidden_states=True).hidden_states
        torch.stack([h[0, c.n_prompt :].mean(0) for h in hs])


@torch.no_grad()
def hf_batched(hf, convs, batch: int, pad: int):
    for i in range(0, len(convs), batch):
        chunk = convs[i : i + batch]
        width = max(len(c.ids) for c in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, c in enumerate(chunk):
            ids[j, : len(c.ids)] = torch.tensor(c.ids)
            mask[j, : len(c.ids)] = 1
        hs = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for j, c in enumerate(chunk):
            torch.stack([h[j, c.n_prompt : len(c.ids)].mean(0) for h in hs])


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_mb(n: int, batch: int) -> float:
    """Peak resident memory of a fresh process that averages n conversations."""
    code = (
        f"import sys, resource; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from bench_activations import conversations\n"
        "from persona_lens import load_model\n"
        "from persona_lens.activations import mean_activations\n"
        "m = load_model('smollm2-135m')\n"
        f"mean_activations(m, conversations(m.tokenizer, {n}), batch_size={batch})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    hf, tok = model.original_model, model.tokenizer
    convs = conversations(tok, args.n)
    n_tokens = sum(len(c.ids) for c in convs)
    pooled_activations(model, convs[: args.batch], batch_size=args.batch)  # warm-up

    t_release = timed(lambda: release_way(hf, convs), repeat=1)
    t_hf = timed(lambda: hf_batched(hf, convs, args.batch, tok.pad_token_id))
    t_ours = timed(lambda: pooled_activations(model, convs, batch_size=args.batch))
    rss = {n: peak_rss_mb(n, args.batch) for n in (32, 128)}
    res = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": model.cfg.model_name,
        "n_conversations": args.n,
        "n_tokens": n_tokens,
        "batch": args.batch,
        "tokens_per_s": {
            "release_one_by_one": n_tokens / t_release,
            "hf_batched_hidden_states": n_tokens / t_hf,
            "persona_lens_pooled": n_tokens / t_ours,
        },
        "speedup_vs_release": t_release / t_ours,
        "ratio_vs_hf_batched": t_hf / t_ours,
        "peak_rss_mb_by_n": rss,
        "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "activations.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
