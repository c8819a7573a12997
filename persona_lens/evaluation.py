"""Steered evaluation, layer and coefficient sweeps, layer choice, and a capability check.

- :func:`evaluate`: answer a trait's held-out evaluation questions under one intervention
  (or none), judge trait and coherence (the judge's disk cache makes re-judging free), and
  return both means with confidence intervals.
- :func:`sweep` / :func:`run_sweep`: every (layer, coef) of a grid. Each generation is keyed
  by (setting, question, seed) in ``generations.jsonl`` and never done twice, so a killed
  sweep resumes. ``run_sweep`` also writes ``sweep.jsonl``, ``best.json`` and the figures.
- :func:`choose_layer`: the highest trait score whose coherence stays >= a threshold.
- :func:`prescreen_layers`: a cheap ranking before any generation: AUROC of held-out pos vs
  neg prompt activations projected on the vector, per layer.
- :func:`mcq_accuracy`: multiple-choice accuracy (MMLU-style: the letter with the highest
  next-token log-probability) under any intervention, to show what steering costs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from persona_lens import ops
from persona_lens.chat import format_chat
from persona_lens.generation import SamplingParams, generate_ids, left_pad
from persona_lens.models import model_info
from persona_lens.runio import read_jsonl, write_atomic
from persona_lens.steering import (
    Intervention,
    SteeringError,
    VectorLike,
    intervene,
    resolve_layers,
    vectors_at,
)
from persona_lens.traits import Trait, load_trait
from persona_lens.vectors import PersonaVector

DATA_DIR = Path(__file__).parent / "data"
MIN_COHERENCE = 80.0
PAPER_COEFS = (0.5, 1.0, 1.5, 2.0, 2.5)  # Qwen2.5-7B in the paper
BASELINE_KEY = "none"


def default_params() -> SamplingParams:
    """The paper samples at temperature 1; short answers keep CPU sweeps affordable."""
    return SamplingParams(max_new_tokens=64, temperature=1.0, top_p=1.0, do_sample=True, seed=0)


# --------------------------------------------------------------------------------------
# The generation store: one jsonl row per finished (setting, question, seed).


class GenerationStore:
    """Append-only ``generations.jsonl``: a row is written as soon as it is generated."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.rows: dict[str, dict] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            rows = [r for r in read_jsonl(self.path) if "key" in r]
            self.rows = {r["key"]: r for r in rows}
            text = self.path.read_text() if self.path.exists() else ""
            if text and (not text.endswith("\n") or len(rows) != text.count("\n")):
                # A line torn by a kill: drop it, or the next append would glue onto it.
                write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.n_generated = 0  # in this process: a resumed sweep shows 0 for finished cells

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> dict:
        return self.rows[key]

    def add(self, rows: Sequence[dict]) -> None:
        for r in rows:
            self.rows[r["key"]] = r
        self.n_generated += len(rows)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())


def item_key(setting: str, question: str, seed: int) -> str:
    return f"{setting}||seed={seed}||{question}"


def vector_fingerprint(vector: VectorLike, pooling: str = "response_avg") -> str:
    """12 hex digits of sha256 over the float32 bytes the intervention would use."""
    t = vector.get(pooling) if isinstance(vector, PersonaVector) else vector
    data = t.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:12]


def setting_key(vector: VectorLike | None, intervention: Intervention | None) -> str:
    """Names a generation setting: the intervention and the exact vector (none: unsteered)."""
    if intervention is None:
        return BASELINE_KEY
    return f"{intervention.key}|v={vector_fingerprint(vector, intervention.pooling)}"


# --------------------------------------------------------------------------------------
# Steered evaluation.


@dataclass
class EvalResult:
    """Mean judge scores of one setting, with 95% confidence intervals."""

    setting: str
    n: int
    trait: float | None
    trait_ci: tuple[float, float]
    coherence: float | None
    coherence_ci: tuple[float, float]
    n_trait_missing: int = 0  # refusals / unparseable judge replies
    intervention: dict | None = None
    samples: list[dict] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        iv = self.intervention or {}
        layers = iv.get("layers")
        return dict(
            setting=self.setting,
            kind=iv.get("kind", BASELINE_KEY),
            layer=layers if not isinstance(layers, list) else None,
            layers=layers,
            coef=iv.get("coef", 0.0) if iv.get("kind", "add") == "add" else None,
            positions=iv.get("positions"),
            n=self.n,
            trait=self.trait,
            trait_lo=self.trait_ci[0],
            trait_hi=self.trait_ci[1],
            coherence=self.coherence,
            coherence_lo=self.coherence_ci[0],
            coherence_hi=self.coherence_ci[1],
            n_trait_missing=self.n_trait_missing,
        )


def _mean_ci(xs: Iterable[float | None]) -> tuple[float | None, tuple[float, float]]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if not vals:
        return None, (math.nan, math.nan)
    m, lo, hi = ops.mean_ci(vals)
    return m, (max(lo, 0.0), min(hi, 100.0))  # judge scores live in [0, 100]


def generate_answers(
    model,
    vector: VectorLike | None,
    questions: Sequence[str],
    intervention: Intervention | None = None,
    *,
    params: SamplingParams | None = None,
    samples: int = 1,
    batch_size: int = 16,
    store: GenerationStore | None = None,
    system: str | None = None,
    progress: bool | str = False,
) -> list[dict]:
    """One answer per (question, sample) under ``intervention``; rows already in ``store``
    are reused, new ones are appended as each batch finishes. Sample s uses seed
    ``params.seed + s``."""
    params = params or default_params()
    if intervention is not None and vector is None:
        raise SteeringError("an intervention needs a vector. Fix: pass vector=...")
    store = store if store is not None else GenerationStore(None)
    setting = setting_key(vector, intervention)
    if system is not None:  # another prompt is another setting
        setting += f"|system={hashlib.sha256(system.encode()).hexdigest()[:12]}"
    tok = model.tokenizer
    wanted = [
        (item_key(setting, q, params.seed + s), q, params.seed + s)
        for s in range(samples)
        for q in questions
    ]
    todo = [w for w in wanted if w[0] not in store]
    ctx = intervene(model, vector, intervention) if intervention is not None else nullcontext()
    with ctx:
        for seed in sorted({w[2] for w in todo}):
            items = [w for w in todo if w[2] == seed]
            for start in range(0, len(items), batch_size):  # store each batch as it finishes
                chunk = items[start : start + batch_size]
                prompts = [format_chat(tok, q, system=system).prompt_ids for _, q, _ in chunk]
                p = dataclasses.replace(params, seed=seed * 1_000_003 + start)
                new = generate_ids(model, prompts, p, batch_size, progress)
                iv = intervention.to_dict() if intervention is not None else None
                store.add(
                    [
                        dict(
                            key=k,
                            setting=setting,
                            question=q,
                            seed=sd,
                            intervention=iv,
                            response=tok.decode(ids, skip_special_tokens=True),
                            n_tokens=len(ids),
                        )
                        for (k, q, sd), ids in zip(chunk, new, strict=True)
                    ]
                )
    return [store[k] for k, _, _ in wanted]


def side_by_side(
    model,
    vector: VectorLike | None,
    prompts: Sequence[str],
    *interventions: Intervention,
    params: SamplingParams | None = None,
    system: str | None = None,
) -> list[dict]:
    """For each prompt: the unsteered answer and one answer per intervention, all with the
    same seed, so differences come from the intervention (``persona-lens steer``, the demo).
    Returns ``[{"prompt": ..., "none": ..., iv.key: ..., ...}]``."""
    params = params or SamplingParams(max_new_tokens=64, do_sample=False)
    out = [{"prompt": p} for p in prompts]
    for iv in (None, *interventions):
        rows = generate_answers(model, vector, prompts, iv, params=params, system=system)
        for o, r in zip(out, rows, strict=True):
            o[iv.key if iv is not None else BASELINE_KEY] = r["response"]
    return out


def evaluate(
    model,
    vector: VectorLike | None,
    trait: Trait | str,
    judge,
    intervention: Intervention | None = None,
    *,
    n_questions: int | None = None,
    samples: int = 1,
    params: SamplingParams | None = None,
    batch_size: int = 16,
    store: GenerationStore | None = None,
    system: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Judge answers to the trait's evaluation questions under ``intervention`` (None: the
    unsteered model). Returns mean trait and coherence (0-100) with 95% CIs. ``system``: a
    system prompt for every question (None: the chat template's default), e.g. a trait-
    eliciting one to see whether ablation removes the trait it brings out."""
    trait = load_trait(trait) if isinstance(trait, str) else trait
    questions = trait.eval_questions[:n_questions] if n_questions else trait.eval_questions
    rows = generate_answers(
        model, vector, questions, intervention, params=params, samples=samples,
        batch_size=batch_size, store=store, system=system, progress=progress,
    )  # fmt: skip
    scores = judge.score(trait, [r["question"] for r in rows], [r["response"] for r in rows],
                         progress=progress)  # fmt: skip
    trait_scores = [s.trait for s in scores]
    coh_scores = [s.coherence for s in scores]
    t, t_ci = _mean_ci(trait_scores)
    c, c_ci = _mean_ci(coh_scores)
    samples_out = [
        dict(question=r["question"], seed=r["seed"], response=r["response"], trait=ts, coherence=cs)
        for r, ts, cs in zip(rows, trait_scores, coh_scores, strict=True)
    ]
    return EvalResult(
        setting=rows[0]["setting"] if rows else setting_key(vector, intervention),
        n=len(rows),
        trait=t,
        trait_ci=t_ci,
        coherence=c,
        coherence_ci=c_ci,
        n_trait_missing=sum(x is None for x in trait_scores),
        intervention=intervention.to_dict() if intervention is not None else None,
        samples=samples_out,
    )


# --------------------------------------------------------------------------------------
# Sweeps and the choice of layer.


def _check_grid(model, layers, coefs) -> tuple[list[int], list[float]]:
    coefs = [float(c) for c in coefs] if coefs is not None else []
    if not coefs:
        raise SteeringError(
            "the coefficient grid is empty. Fix: pass at least one coefficient, e.g. "
            f"coefs={list(PAPER_COEFS)} (the paper's grid; negative values suppress the trait)."
        )
    if any(not math.isfinite(c) for c in coefs):
        raise SteeringError(f"coefficients must be finite numbers, got {coefs}.")
    layers = resolve_layers(model, "all" if layers is None else layers)
    return layers, list(dict.fromkeys(coefs))


def sweep(
    model,
    vector: VectorLike,
    trait: Trait | str,
    judge,
    layers: Sequence[int] | None = None,
    coefs: Sequence[float] = PAPER_COEFS,
    out_dir: str | Path | None = None,
    *,
    positions: str = "response",
    pooling: str = "response_avg",
    scale: str = "raw",
    n_questions: int | None = None,
    samples: int = 1,
    params: SamplingParams | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Score every (layer, coef): (rows, baseline row). ``layers=None``: every block output.

    A layer sweep is ``coefs=[c]``; a coefficient sweep is ``layers=[L]``. With ``out_dir``,
    generations go to ``generations.jsonl`` (resumable) and rows to ``sweep.jsonl``.
    """
    trait = load_trait(trait) if isinstance(trait, str) else trait
    layers, coefs = _check_grid(model, layers, coefs)
    vectors_at(model, vector, layers, pooling)  # fail on a bad vector before any generation
    out = Path(out_dir) if out_dir is not None else None
    store = GenerationStore(out / "generations.jsonl" if out is not None else None)
    kw = dict(n_questions=n_questions, samples=samples, params=params or default_params(),
              batch_size=batch_size, store=store)  # fmt: skip
    baseline = evaluate(model, None, trait, judge, None, **kw).row()
    rows = []
    grid = [(layer, c) for layer in layers for c in coefs]
    bar = tqdm(grid, desc=f"sweep {trait.name}", disable=not progress, unit="setting")
    for layer, c in bar:
        iv = Intervention("add", layer, c, positions, pooling, scale)
        rows.append(evaluate(model, vector, trait, judge, iv, **kw).row())
        if out is not None:  # rewritten after every cell: a killed sweep keeps finished rows
            write_atomic(out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows, baseline


def choose_layer(rows: Sequence[dict], min_coherence: float = MIN_COHERENCE) -> dict:
    """The row with the highest mean trait among those with mean coherence >= min_coherence,
    and why. Ties go to the smaller |coef|, then the earlier layer."""
    scored = [r for r in rows if r.get("trait") is not None and r.get("coherence") is not None]
    if not scored:
        return dict(layer=None, coef=None, reason="no setting has judge scores.", row=None)
    ok = [r for r in scored if r["coherence"] >= min_coherence]
    pool, why = ok, f"highest mean trait among {len(ok)} of {len(scored)} settings with mean "
    why += f"coherence >= {min_coherence:g}"
    if not ok:  # nothing is coherent enough: say so, and fall back to the most coherent half
        cut = float(np.median([r["coherence"] for r in scored]))
        pool = [r for r in scored if r["coherence"] >= cut]
        why = (
            f"no setting kept mean coherence >= {min_coherence:g} (best: "
            f"{max(r['coherence'] for r in scored):.1f}); fell back to the highest mean trait "
            f"among the {len(pool)} settings with coherence >= the median ({cut:.1f})"
        )
    best = max(pool, key=lambda r: (r["trait"], -abs(r.get("coef") or 0), -(r.get("layer") or 0)))
    reason = (
        f"layer {best['layer']}, coef {best['coef']:g}: trait {best['trait']:.1f}, "
        f"coherence {best['coherence']:.1f}; {why}."
    )
    return dict(layer=best["layer"], coef=best["coef"], trait=best["trait"],
                coherence=best["coherence"], min_coherence=min_coherence, coherent=bool(ok),
                reason=reason, row=best)  # fmt: skip


def run_sweep(
    model,
    vector: VectorLike,
    trait: Trait | str,
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    coefs: Sequence[float] = PAPER_COEFS,
    judge=None,
    *,
    min_coherence: float = MIN_COHERENCE,
    prescreen_top: int | None = None,
    plot: bool = True,
    **kw,
) -> dict:
    """Sweep, choose, plot. Writes into ``out_dir``: ``generations.jsonl`` (resumable),
    ``sweep.jsonl`` (one row per (layer, coef) with means, CIs and n), ``best.json``,
    ``sweep.png`` / ``sweep.pdf``, and ``prescreen.json`` when ``prescreen_top`` is set
    (then only the top layers by AUROC are swept). Returns the best.json content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trait = load_trait(trait) if isinstance(trait, str) else trait
    if judge is None:  # the offline default, with its disk cache in the sweep folder
        from persona_lens.judges import make_judge

        judge = make_judge("offline", cache_path=out / "judgments.sqlite")
    screen = None
    if prescreen_top:
        screen = prescreen_layers(model, vector, trait, pooling=kw.get("pooling", "response_avg"))
        (out / "prescreen.json").write_text(json.dumps(screen, indent=2) + "\n")
        if layers is None:
            layers = sorted(r["layer"] for r in screen[:prescreen_top])
    rows, baseline = sweep(model, vector, trait, judge, layers, coefs, out, **kw)
    best = choose_layer(rows, min_coherence)
    info = model_info(model)
    best.update(
        trait_name=trait.name, model_id=info.model_id, baseline=baseline,
        gain=(best["trait"] - baseline["trait"])
        if best.get("trait") is not None and baseline["trait"] is not None else None,
        judge=getattr(judge, "name", type(judge).__name__), n_settings=len(rows),
    )  # fmt: skip
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    if plot:
        from persona_lens.plots import plot_sweep

        plot_sweep(rows, out / "sweep", baseline=baseline, best=best, title=trait.name)
    return best


# --------------------------------------------------------------------------------------
# The cheap pre-screen: per-layer separation of held-out pos / neg activations.


@torch.no_grad()
def prescreen_layers(
    model,
    vector: VectorLike,
    trait: Trait | str,
    *,
    pooling: str = "response_avg",
    activation_pooling: str = "prompt_last",
    n_questions: int | None = None,
    n_pairs: int | None = None,
    batch_size: int = 8,
) -> list[dict]:
    """Rank layers before generating anything: for each layer, project the held-out (eval
    question) prompts under the pos and neg system prompts on v_hat_L and take the AUROC.
    Sorted best first. Only prompt forward passes: seconds, not hours."""
    from persona_lens.activations import pooled_activations

    trait = load_trait(trait) if isinstance(trait, str) else trait
    questions = trait.eval_questions[:n_questions] if n_questions else trait.eval_questions
    pairs = range(min(n_pairs or len(trait.pairs), len(trait.pairs)))
    tok = model.tokenizer
    convs, labels = [], []
    for side in ("pos", "neg"):
        for i in pairs:
            for q in questions:
                convs.append(format_chat(tok, q, system=trait.system_prompt(side, i)))
                labels.append(side == "pos")
    acts = pooled_activations(model, convs, [activation_pooling], batch_size)[activation_pooling]
    rows = vectors_at(model, vector, "all", pooling)
    out = []
    for layer, v in rows.items():
        proj = ops.projection(acts[:, layer], v).numpy()
        pos, neg = proj[np.array(labels)], proj[~np.array(labels)]
        gap = float(pos.mean() - neg.mean())
        d_prime = gap / math.sqrt(0.5 * (pos.var() + neg.var()) + 1e-12)
        out.append(dict(layer=layer, auroc=ops.auroc(proj, labels), gap=gap, d_prime=d_prime))
    return sorted(out, key=lambda r: (-r["auroc"], -r["d_prime"]))


# --------------------------------------------------------------------------------------
# Capability: multiple-choice accuracy (MMLU-style).

LETTERS = "ABCDEFGHIJ"
MCQ_INSTRUCTION = "Answer with the letter of the correct option only."


@dataclass(frozen=True)
class MCQ:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""

    def prompt(self) -> str:
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n\n{opts}\n\n{MCQ_INSTRUCTION}"


def _answer_index(a, n_choices: int, where: str) -> int:
    if isinstance(a, str) and a.strip().upper() in LETTERS[:n_choices] and a.strip():
        return LETTERS.index(a.strip().upper())
    if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < n_choices:
        return a
    raise ValueError(
        f"{where}: answer {a!r} is neither a letter A-{LETTERS[n_choices - 1]} nor an index "
        f"0..{n_choices - 1}."
    )


def _from_dict(d: dict, where: str, subject: str = "") -> MCQ:
    if "choices" in d:
        choices = d["choices"]
    else:  # {"A": ..., "B": ..., ...}
        choices = [d[k] for k in LETTERS if k in d]
    if "question" not in d or len(choices) < 2 or "answer" not in d:
        raise ValueError(
            f"{where}: a multiple-choice item needs 'question', 'choices' (or keys A, B, C, D) "
            "and 'answer' (letter or index)."
        )
    choices = tuple(str(c) for c in choices)
    return MCQ(str(d["question"]), choices, _answer_index(d["answer"], len(choices), where),
               str(d.get("subject", subject)))  # fmt: skip


def load_mcq(path: str | Path) -> list[MCQ]:
    """Multiple-choice questions from:

    - the standard MMLU CSV layout: ``question,A,B,C,D,answer`` per row, no header (a header
      row is skipped); the subject is the file name without ``_test``/``_dev``/``_val``;
    - a folder of such CSVs (e.g. MMLU's ``data/test``);
    - JSON (a list of objects) or JSONL: ``question``, ``choices`` (or ``A``..``D``),
      ``answer`` as a letter or a 0-based index (the HF ``cais/mmlu`` layout), ``subject``.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.csv")) + sorted(path.glob("*.json*"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .csv, .json or .jsonl files.")
        return [q for f in files for q in load_mcq(f)]
    if not path.is_file():
        raise FileNotFoundError(f"no multiple-choice file at {path}.")
    if path.suffix == ".csv":
        subject = path.stem
        for suffix in ("_test", "_dev", "_val"):
            subject = subject.removesuffix(suffix)
        out = []
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row:
                    continue
                if i == 0 and row[-1].strip().lower() == "answer":
                    continue  # a header
                if len(row) < 4:
                    raise ValueError(f"{path}:{i + 1}: expected question,A,B,C,D,answer.")
                choices = tuple(row[1:-1])
                answer = _answer_index(row[-1], len(choices), f"{path}:{i + 1}")
                out.append(MCQ(row[0], choices, answer, subject))
        return out
    if path.suffix == ".jsonl":
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return [_from_dict(json.loads(ln), f"{path}:{i + 1}") for i, ln in enumerate(lines)]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data = data.get("questions", data) if isinstance(data, dict) else data
        return [_from_dict(d, f"{path}[{i}]") for i, d in enumerate(data)]
    raise ValueError(f"{path}: unknown format; use .csv (MMLU layout), .json or .jsonl.")


def shipped_mcq(name: str = "general") -> list[MCQ]:
    """A small multiple-choice set written for this project, for offline runs."""
    return load_mcq(DATA_DIR / "mcq" / f"{name}.jsonl")


def _letter_ids(tok, n: int) -> list[list[int]]:
    """Token ids that spell each letter as the first answer token ("A" and " A")."""
    out = []
    for letter in LETTERS[:n]:
        ids = {tok.encode(s, add_special_tokens=False)[0] for s in (letter, " " + letter)}
        out.append(sorted(ids))
    return out


@torch.no_grad()
def mcq_logprobs(
    model,
    items: Sequence[MCQ],
    vector: VectorLike | None = None,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    method: Literal["letter", "cloze"] = "letter",
    progress: bool = False,
) -> Float[Tensor, "n n_choices"]:
    """A score per option (-inf where an item has fewer options).

    ``letter`` (MMLU): next-token log-probability of the option's letter after the chat
    prompt listing the options. ``cloze``: log-probability of the option's text as the
    answer to the bare question (summed over its tokens); models under ~1B parameters answer
    letters at chance, but their cloze scores still rank options (SmolLM2-135M: 65% vs 22%
    on the shipped set). Under ``intervention``, ``response`` positions are the last prompt
    token (letter) or the last prompt token and the option's tokens (cloze).
    """
    if method not in ("letter", "cloze"):
        raise ValueError(f"method must be 'letter' or 'cloze', got {method!r}.")
    tok = model.tokenizer
    n_max = max(len(q.choices) for q in items)
    device = next(model.parameters()).device
    out = torch.full((len(items), n_max), -math.inf)
    if method == "letter":
        letter_ids = _letter_ids(tok, n_max)
        convs = [format_chat(tok, q.prompt()) for q in items]
        where = [(i, None) for i in range(len(items))]
    else:
        convs = [format_chat(tok, q.question, answer=c) for q in items for c in q.choices]
        where = [(i, k) for i, q in enumerate(items) for k in range(len(q.choices))]
    ctx = intervene(model, vector, intervention) if intervention is not None else nullcontext()
    with ctx as info:
        starts = range(0, len(convs), batch_size)
        for s in tqdm(starts, desc=f"mcq ({method})", disable=not progress, unit="batch"):
            chunk = convs[s : s + batch_size]
            ids, mask = left_pad([c.ids for c in chunk], tok.pad_token_id)
            if info is not None:  # tell the hooks where each row's answer starts
                n_pad = (mask == 0).sum(1)
                info.response_start = n_pad + torch.tensor([c.n_prompt for c in chunk])
            logits = model(ids.to(device), attention_mask=mask.to(device)).float()
            if method == "letter":
                lp = logits[:, -1].log_softmax(-1).cpu()
                for j, (i, _) in enumerate(where[s : s + batch_size]):
                    for k in range(len(items[i].choices)):
                        out[i, k] = lp[j, letter_ids[k]].max()
                continue
            lp = logits[:, :-1].log_softmax(-1).cpu()
            width = ids.shape[1]
            for j, ((i, k), c) in enumerate(zip(where[s : s + batch_size], chunk, strict=True)):
                n_ans = len(c.ids) - c.n_prompt
                tgt = ids[j, width - n_ans :]
                out[i, k] = lp[j, width - n_ans - 1 : width - 1].gather(1, tgt[:, None]).sum()
        if info is not None:
            info.response_start = None
    return out


def mcq_accuracy(
    model,
    items: Sequence[MCQ] | None = None,
    vector: VectorLike | None = None,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    method: Literal["letter", "cloze"] = "letter",
    progress: bool = False,
) -> dict:
    """Accuracy (the best-scored option, see :func:`mcq_logprobs`) with a 95% Wilson
    interval. ``items=None``: the shipped general set."""
    items = list(items) if items is not None else shipped_mcq()
    if not items:
        raise ValueError("no multiple-choice items. Fix: pass items or use shipped_mcq().")
    lp = mcq_logprobs(model, items, vector, intervention, batch_size, method, progress)
    pred = lp.argmax(-1).tolist()
    correct = [p == q.answer for p, q in zip(pred, items, strict=True)]
    k, n = sum(correct), len(items)
    lo, hi = wilson(k, n)
    return dict(accuracy=k / n, lo=lo, hi=hi, n=n, correct=k, method=method,
                setting=intervention.key if intervention is not None else BASELINE_KEY,
                chance=float(np.mean([1 / len(q.choices) for q in items])))  # fmt: skip


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
