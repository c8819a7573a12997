"""The paper's system-prompt spectrum experiment for the focal traits, on the vectors that
`make demo` extracted: 8 system prompts x 20 evaluation questions, one sampled answer each
(temperature 1, 64 tokens; --samples N for N), last-prompt-token projection at the layer the
demo's sweep chose, scored by the offline judge. Resumable; writes runs/monitor-TRAIT/ and
experiments/results/spectrum.json and spectrum-TRAIT.png (the README's monitoring figures).

    make demo && .venv/bin/python experiments/spectrum.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from persona_lens import load_model
from persona_lens.judges import make_judge
from persona_lens.monitoring import run_monitor

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="`make demo` output")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--traits", default="evil,sycophantic,hallucinating")
    ap.add_argument("--samples", type=int, default=1, help="answers per prompt")
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    results = {}
    RESULTS.mkdir(exist_ok=True)
    for name in args.traits.split(","):
        layer = json.loads((args.demo / name / "sweep" / "best.json").read_text())["layer"]
        tag = f"-x{args.samples}" if args.samples > 1 else ""
        out = args.out / f"monitor-{name}{tag}"
        judge = make_judge("offline", cache_path=out / "judgments.sqlite",
                           model=(model.original_model, model.tokenizer))  # fmt: skip
        run = run_monitor(model, args.demo / name, name, layer, "spectrum", out, judge,
                          max_new_tokens=64, n_samples=args.samples)  # fmt: skip
        s = run.summary
        results[name] = dict(
            layer=layer, overall=s.overall.__dict__, between_means=s.between_means.__dict__,
            within_pooled=s.within_pooled.__dict__ if s.within_pooled else None,
            prompt_means=s.prompt_means.__dict__ if s.prompt_means else None,
            auroc=s.classifier.auroc if s.classifier else None,
            condition_means={c.label: (c.mean_projection, c.mean_trait) for c in s.conditions},
        )  # fmt: skip
        shutil.copy(run.files["monitor_png"], RESULTS / f"spectrum-{name}{tag}.png")
        print(name, f"layer {layer}:", s.overall, "| per prompt:", s.prompt_means)
    (RESULTS / f"spectrum{tag}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
