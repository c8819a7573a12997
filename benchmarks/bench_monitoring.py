"""What monitoring costs: monitored generation vs the same generation without the monitor.

SmolLM2-135M on this machine's CPU, bridge backend, fp32, one batch of 8 chat prompts, 32
new tokens, sampling with the same seed (so both produce the same tokens: the same work).
Repeats are interleaved, alternating which goes first, so load from other processes hits
both alike; the ratio uses the median and the minimum over repeats of one run. For
reference it also times the post-hoc way to get the same projections: generate, then one
teacher-forced pass over prompt + response.

    python benchmarks/bench_monitoring.py [--repeats 7] [--new 32] [--batch 8] [--layer 20]
                                          [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from persona_lens import format_chat, load_model
from persona_lens.generation import SamplingParams, generate_ids
from persona_lens.monitoring import generate_monitored, project
from persona_lens.traits import load_spectrum, load_trait
from persona_lens.vectors import PersonaVector

RESULTS = Path(__file__).parent / "results"


def time_in_hooks(monitored) -> float:
    """Seconds spent inside the monitor's own hooks (the projection recorder and the pass
    tracker) during one monitored generation: the direct cost, free of machine noise."""
    from persona_lens import monitoring, steering

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        return wrapper

    call, mask = monitoring.ProjectionRecorder.__call__, steering._pass_from_mask
    monitoring.ProjectionRecorder.__call__ = timed(call)
    steering._pass_from_mask = timed(mask)
    try:
        monitored()
    finally:
        monitoring.ProjectionRecorder.__call__, steering._pass_from_mask = call, mask
    return spent[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "monitoring.json")
    args = ap.parse_args()
    # One thread by default: on a shared 2-core machine two OpenMP threads spin against the
    # other jobs and single timings swing several-fold; the ratio is what is measured.
    torch.set_num_threads(args.threads)

    load0 = os.getloadavg()
    model = load_model("smollm2-135m", device="cpu", dtype="float32")
    tok = model.tokenizer
    trait = load_trait("evil")
    spectrum = load_spectrum("evil")
    prompts = [
        format_chat(tok, trait.eval_questions[i], system=spectrum[i % len(spectrum)][1])
        for i in range(args.batch)
    ]
    # Sorted by length: the monitor's batching and generate_ids' then see the same batch.
    prompts.sort(key=lambda p: len(p.prompt_ids))
    ids = [p.prompt_ids for p in prompts]
    # The timing does not depend on the direction; a random one keeps the benchmark standalone.
    g = torch.Generator().manual_seed(0)
    vec = PersonaVector({"response_avg": torch.randn(model.cfg.n_layers + 1, model.cfg.d_model,
                                                     generator=g)})  # fmt: skip
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=0)

    def plain():
        return generate_ids(model, ids, params, batch_size=args.batch)

    def monitored():
        return generate_monitored(model, prompts, vec, args.layer, params, batch_size=args.batch)

    def post_hoc():
        new = plain()
        convs = [
            format_chat(tok, p.messages[-1]["content"], system=p.messages[0]["content"],
                        answer_ids=n)
            for p, n in zip(prompts, new, strict=True)
        ]  # fmt: skip
        return project(model, convs, vec, args.layer, batch_size=args.batch)

    out_plain, out_mon = plain(), monitored()  # warm-up, and the same tokens check
    same = [m.response_ids for m in out_mon] == out_plain
    post_hoc()
    names = ("plain", "monitored", "post_hoc")
    fns = {"plain": plain, "monitored": monitored, "post_hoc": post_hoc}
    # Wall time, and this process's CPU time: with one thread the CPU time is the work done,
    # and other jobs on a shared machine barely move it (wall time swings 2x with them).
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        order = ["plain", "monitored"] if r % 2 == 0 else ["monitored", "plain"]
        for name in [*order, "post_hoc"]:
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
        print(
            f"repeat {r}: "
            + ", ".join(f"{k} {wall[k][-1]:.2f}s wall / {cpu[k][-1]:.2f}s cpu" for k in names)
        )
    hook_s = time_in_hooks(monitored)

    def ratios(t: dict[str, list[float]], what: str) -> dict:
        med = {k: statistics.median(v) for k, v in t.items()}
        # Per-repeat ratios: neighbours in time share the machine's load.
        paired = [m / p for m, p in zip(t["monitored"], t["plain"], strict=True)]
        post = [q / p for q, p in zip(t["post_hoc"], t["plain"], strict=True)]
        return {
            f"{what}_s": t,
            f"{what}_median_s": med,
            f"{what}_ratio_median": med["monitored"] / med["plain"],
            f"{what}_ratio_min": min(t["monitored"]) / min(t["plain"]),
            f"{what}_ratio_paired_median": statistics.median(paired),
            f"{what}_post_hoc_ratio_paired_median": statistics.median(post),
        }

    n_tokens = sum(len(x) for x in out_plain)
    result = dict(
        what="monitored generation / the same generation without the monitor",
        model=model.cfg.model_name,
        backend="bridge",
        device="cpu",
        dtype="float32",
        batch=args.batch,
        max_new_tokens=args.new,
        generated_tokens=n_tokens,
        layer=args.layer,
        repeats=args.repeats,
        same_tokens_with_and_without_monitor=same,
        **ratios(wall, "wall"),
        **ratios(cpu, "cpu"),
        seconds_inside_monitor_hooks=hook_s,
        hook_share_of_plain_generation=hook_s / statistics.median(cpu["plain"]),
        target_ratio=1.05,
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        loadavg_start=load0,
        loadavg_end=os.getloadavg(),
        platform=platform.platform(),
        torch=torch.__version__,
        note="machine shared with other jobs during the run: see loadavg; interleaved repeats",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for w in ("wall", "cpu"):
        print(
            f"{w}: monitored/plain median {result[f'{w}_ratio_median']:.3f}, min "
            f"{result[f'{w}_ratio_min']:.3f}, paired median "
            f"{result[f'{w}_ratio_paired_median']:.3f} (target <= 1.05); post-hoc projection "
            f"{result[f'{w}_post_hoc_ratio_paired_median']:.3f}"
        )
    print(
        f"inside the monitor's hooks: {hook_s * 1e3:.1f} ms per generation "
        f"({100 * result['hook_share_of_plain_generation']:.2f}% of it); same tokens: {same}; "
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
