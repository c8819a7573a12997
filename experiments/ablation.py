"""Does removing the evil direction lower the evil score? Steering-style interventions at one
layer and at every layer, with and without a trait-eliciting system prompt, on the 20
held-out questions x 2 samples (temperature 1, 48 tokens), scored by the offline judge.
Resumable; writes runs/ablation-evil/ and experiments/results/ablation.json.

    make demo && .venv/bin/python experiments/ablation.py --layer 16
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from persona_lens import load_model, load_vector
from persona_lens.evaluation import GenerationStore, evaluate
from persona_lens.generation import SamplingParams
from persona_lens.judges import make_judge
from persona_lens.steering import Intervention
from persona_lens.traits import load_trait

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vector", type=Path, default=Path("runs/demo/evil"))
    ap.add_argument("--layer", type=int, default=None, help="default: the demo sweep's choice")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation-evil"))
    args = ap.parse_args()
    layer = args.layer or json.loads((args.vector / "sweep" / "best.json").read_text())["layer"]
    model = load_model("smollm2-135m")
    vec, trait = load_vector(args.vector), load_trait("evil")
    args.out.mkdir(parents=True, exist_ok=True)
    judge = make_judge("offline", cache_path=args.out / "judgments.sqlite",
                       model=(model.original_model, model.tokenizer))  # fmt: skip
    kw = dict(params=SamplingParams(48, 1.0, 1.0, True, 0), samples=2, batch_size=20,
              store=GenerationStore(args.out / "generations.jsonl"))  # fmt: skip
    settings = {
        "unsteered": None,
        f"ablate layer {layer} (response)": Intervention("ablate", layer, positions="response"),
        "ablate every layer (response)": Intervention("ablate", "all", positions="response"),
        "mean-ablate every layer (response)": Intervention("mean_ablate", "all"),
        "mean-ablate every layer (all positions)": Intervention(
            "mean_ablate", "all", positions="all"
        ),
        f"add -4 v_{layer}": Intervention("add", layer, -4.0),
    }
    systems = {"template default": None, "evil system prompt": trait.system_prompt("pos", 3)}
    rows = []
    for sys_name, system in systems.items():
        for name, iv in settings.items():
            r = evaluate(model, vec, trait, judge, iv, system=system, **kw)
            rows.append(dict(system=sys_name, setting=name, trait=r.trait, trait_ci=r.trait_ci,
                             coherence=r.coherence, n=r.n))  # fmt: skip
            print(f"{sys_name:18s} {name:40s} trait {r.trait:5.1f} "
                  f"[{r.trait_ci[0]:.1f}, {r.trait_ci[1]:.1f}]  coherence {r.coherence:5.1f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ablation.json").write_text(
        json.dumps(dict(layer=layer, rows=rows), indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
