"""Extracting a persona vector: elicit, judge, filter, pool activations, take the difference.

Every stage writes to the run folder as it goes, so a killed run resumes where it stopped:
``responses.jsonl`` gains rows batch by batch (generation is never redone), the judge has its
own disk cache, and the vector is written last.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from persona_lens.activations import mean_activations
from persona_lens.chat import ChatPrompt, format_chat
from persona_lens.generation import SamplingParams, generate_ids
from persona_lens.models import hf_model_of, model_info
from persona_lens.runio import append_jsonl, read_jsonl, write_jsonl_atomic
from persona_lens.traits import Trait, load_trait
from persona_lens.vectors import POOLINGS, PersonaVector


class ExtractionError(RuntimeError):
    """Extraction cannot go on; the message says which setting to change."""


@dataclass
class ExtractConfig:
    """Settings of one extraction run. The paper: 10 samples, 1000 new tokens."""

    samples_per_question: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_kept: int = 10
    n_questions: int | None = None  # None: every extraction question
    n_pairs: int | None = None  # None: every instruction pair


@dataclass
class ExtractionRecord:
    """What happened in a run: counts at each stage, for the README and for provenance."""

    n_pairs_total: int
    n_kept: int
    n_pos_trait_ok: int
    n_neg_trait_ok: int
    n_coherent: int
    n_missing_scores: int
    mean_trait: dict[str, float] = field(default_factory=dict)
    out: str | None = None


def _row_key(side: str, i: int, q: int, s: int) -> str:
    return f"{side}|{i}|{q}|{s}"


def plan(trait: Trait, cfg: ExtractConfig) -> Iterator[dict]:
    """Every (side, instruction, question, sample) the run elicits, in a fixed order."""
    pairs = trait.pairs[: cfg.n_pairs] if cfg.n_pairs else trait.pairs
    questions = (
        trait.extract_questions[: cfg.n_questions] if cfg.n_questions else trait.extract_questions
    )
    for side in ("pos", "neg"):
        for i in range(len(pairs)):
            for q, question in enumerate(questions):
                for s in range(cfg.samples_per_question):
                    yield dict(
                        key=_row_key(side, i, q, s),
                        side=side,
                        instruction_index=i,
                        question_index=q,
                        sample=s,
                        question=question,
                        system_prompt=trait.system_prompt(side, i),
                    )


GENERATION_FIELDS = (
    "samples_per_question",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "n_questions",
    "n_pairs",
)


def _settings(model, trait: Trait, cfg: ExtractConfig) -> dict:
    """What the responses depend on. Judge and thresholds are not here: changing them
    re-filters (and re-judges through the cache) without generating again."""
    gen = {k: getattr(cfg, k) for k in GENERATION_FIELDS}
    return dict(
        model_id=model_info(model).model_id, trait=trait.name, trait_hash=trait.hash, generation=gen
    )


def _check_run_folder(out: Path, settings: dict, force: bool) -> None:
    """Refuse to mix runs: an existing folder must hold a run with the same settings."""
    run_file = out / "run.json"
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old != settings and not force:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise ExtractionError(
                f"{out} holds a run with other settings ({', '.join(diff)} differ). "
                "Fix: choose another --out, or pass --force (force=True) to start it afresh."
            )
        if old != settings:  # forced: the old responses belong to other settings
            for name in ("responses.jsonl", "vector.safetensors", "vector.json"):
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def elicit(model, trait: Trait, cfg: ExtractConfig, out: Path, progress: bool = True) -> list[dict]:
    """Generate every planned response not already in ``out/responses.jsonl``."""
    path = out / "responses.jsonl"
    done = {r["key"]: r for r in read_jsonl(path)}
    todo = [r for r in plan(trait, cfg) if r["key"] not in done]
    tok = model.tokenizer
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, True, cfg.seed)
    chunk = cfg.batch_size * 4
    bar = tqdm(total=len(todo), desc=f"generate {trait.name}", disable=not progress, unit="resp")
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        prompts = [format_chat(tok, r["question"], system=r["system_prompt"]) for r in rows]
        # Seed each chunk by its position in the plan, so a resumed run samples the same way.
        chunk_params = dataclasses.replace(params, seed=cfg.seed * 100_003 + start)
        new = generate_ids(model, [p.ids for p in prompts], chunk_params, cfg.batch_size)
        for r, p, ids in zip(rows, prompts, new, strict=True):
            r.update(
                prompt=p.text,
                prompt_ids=p.ids,
                response_ids=ids,
                response=tok.decode(ids, skip_special_tokens=True),
                trait_score=None,
                coherence_score=None,
                kept=None,
            )
            done[r["key"]] = r
        append_jsonl(path, rows)
        bar.update(len(rows))
    bar.close()
    return [done[r["key"]] for r in plan(trait, cfg)]


def judge_rows(rows: list[dict], trait: Trait, judge, out: Path, progress: bool = True) -> None:
    """Fill trait and coherence scores (the judge's disk cache makes reruns free)."""
    # Every row, every time: the cache answers what was judged before, and a changed judge
    # never leaves stale scores behind.
    scores = judge.score(
        trait, [r["question"] for r in rows], [r["response"] for r in rows], progress=progress
    )
    for r, s in zip(rows, scores, strict=True):
        r["trait_score"], r["coherence_score"] = s.trait, s.coherence
    write_jsonl_atomic(out / "responses.jsonl", rows)


def filter_pairs(rows: list[dict], cfg: ExtractConfig) -> ExtractionRecord:
    """Keep a (pos, neg) pair when pos trait >= threshold, neg trait < threshold and both
    are coherent. Marks ``kept`` on every row; missing scores are never kept."""
    by_key = {r["key"]: r for r in rows}
    n_pos_ok = n_neg_ok = n_coh = n_kept = n_missing = n_total = 0

    def ok(x, cmp):
        return x is not None and cmp(x)

    for r in rows:
        if r["side"] != "pos":
            continue
        neg = by_key[r["key"].replace("pos|", "neg|", 1)]
        n_total += 1
        scores = (
            r["trait_score"],
            neg["trait_score"],
            r["coherence_score"],
            neg["coherence_score"],
        )
        n_missing += sum(s is None for s in scores)
        pos_ok = ok(r["trait_score"], lambda x: x >= cfg.trait_threshold)
        neg_ok = ok(neg["trait_score"], lambda x: x < cfg.trait_threshold)
        coh = all(ok(x, lambda x: x >= cfg.coherence_threshold) for x in scores[2:])
        keep = pos_ok and neg_ok and coh
        r["kept"] = neg["kept"] = keep
        n_pos_ok, n_neg_ok, n_coh, n_kept = (
            n_pos_ok + pos_ok,
            n_neg_ok + neg_ok,
            n_coh + coh,
            n_kept + keep,
        )
    mean_trait = {}
    for side in ("pos", "neg"):
        vals = [
            r["trait_score"] for r in rows if r["side"] == side and r["trait_score"] is not None
        ]
        if vals:
            mean_trait[side] = sum(vals) / len(vals)
    return ExtractionRecord(n_total, n_kept, n_pos_ok, n_neg_ok, n_coh, n_missing, mean_trait)


def _conversations(rows: list[dict], side: str, tokenizer) -> list[ChatPrompt]:
    """The exact sampled tokens, teacher-forced: no re-tokenization of the response text."""
    return [
        format_chat(
            tokenizer,
            r["question"],
            system=r["system_prompt"],
            answer=r["response"],
            answer_ids=r["response_ids"],
        )
        for r in rows
        if r["side"] == side and r["kept"] and r["response_ids"]
    ]


def extract(
    model,
    trait: Trait | str,
    judge=None,
    out: str | Path | None = None,
    config: ExtractConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[PersonaVector, ExtractionRecord]:
    """Extract a persona vector for ``trait`` from ``model``; writes ``responses.jsonl``,
    ``vector.safetensors`` and ``vector.json`` into ``out`` and resumes a killed run."""
    from persona_lens import __version__
    from persona_lens.judges import make_judge

    cfg = config or ExtractConfig()
    trait = load_trait(trait) if isinstance(trait, str) else trait
    out = Path(out) if out is not None else Path("runs") / trait.name
    if judge is None:  # the offline judge, reusing this model's weights for coherence
        hf = hf_model_of(model)
        lm = {"model": (hf, model.tokenizer)} if hf is not None else {}
        judge = make_judge("offline", cache_path=out / "judgments.sqlite", **lm)
    settings = _settings(model, trait, cfg)
    _check_run_folder(out, settings, force)

    rows = elicit(model, trait, cfg, out, progress)
    judge_rows(rows, trait, judge, out, progress)
    record = filter_pairs(rows, cfg)
    record.out = str(out)
    write_jsonl_atomic(out / "responses.jsonl", rows)
    if record.n_kept < cfg.min_kept:
        raise ExtractionError(
            f"only {record.n_kept} of {record.n_pairs_total} response pairs passed the filter "
            f"(need {cfg.min_kept}): pos trait >= {cfg.trait_threshold}: {record.n_pos_trait_ok}, "
            f"neg trait < {cfg.trait_threshold}: {record.n_neg_trait_ok}, both coherent >= "
            f"{cfg.coherence_threshold}: {record.n_coherent}, missing scores: "
            f"{record.n_missing_scores}. Fix: raise --samples-per-question, lower "
            "--trait-threshold or --coherence-threshold, lower --min-kept, or use a stronger "
            "judge. Responses and judgments are kept in the folder; a rerun reuses them."
        )

    tok = model.tokenizer
    means = {
        side: mean_activations(
            model,
            _conversations(rows, side, tok),
            POOLINGS,
            batch_size=max(1, cfg.batch_size // 2),
            progress=f"activations {trait.name} {side}" if progress else False,
        )
        for side in ("pos", "neg")
    }
    vectors = {k: means["pos"][k] - means["neg"][k] for k in POOLINGS}
    info = model_info(model)
    meta = dict(
        settings,
        judge=judge.name,
        config=dataclasses.asdict(cfg),
        backend=info.backend,
        n_layers=info.n_layers,
        d_model=info.d_model,
        judge_thresholds=dict(trait=cfg.trait_threshold, coherence=cfg.coherence_threshold),
        record=dataclasses.asdict(record),
        persona_lens_version=__version__,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        layer_convention="row L = HF hidden_states[L]; 0 = embedding output",
        norms_response_avg=[round(float(x), 4) for x in vectors["response_avg"].norm(dim=-1)],
    )
    vec = PersonaVector(vectors, meta)
    vec.save(out)
    return vec, record
