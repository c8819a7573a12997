"""End-to-end extraction on the real SmolLM2, checked against plain HF with no persona_lens code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import load_cached

from persona_lens.extraction import ExtractConfig, ExtractionError, extract
from persona_lens.judges import make_judge
from persona_lens.vectors import POOLINGS, load_vector

CFG = ExtractConfig(
    samples_per_question=1,
    max_new_tokens=20,
    batch_size=8,
    n_questions=4,
    min_kept=2,
    coherence_threshold=30.0,
)


def _judge(model, out):
    return make_judge(
        "offline",
        cache_path=out / "judgments.sqlite",
        model=(model.original_model, model.tokenizer),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, smol_folder):
    out = tmp_path_factory.mktemp("run") / "evil"
    model = load_cached(smol_folder, "bridge")
    judge = _judge(model, out)
    vec, rec = extract(model, "evil", judge=judge, out=out, config=CFG, progress=False)
    return out, vec, rec


def _hf_reference_vector(folder, rows) -> torch.Tensor:
    """response_avg mean(pos) - mean(neg) with HF output_hidden_states, one row at a time."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sums = {"pos": 0.0, "neg": 0.0}
    counts = {"pos": 0, "neg": 0}
    for r in rows:
        if not r["kept"]:
            continue
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            hs = hf(ids, output_hidden_states=True).hidden_states
        h = torch.stack(hs)[:, 0].double()  # [layers, pos, d]
        sums[r["side"]] = sums[r["side"]] + h[:, len(r["prompt_ids"]) :].mean(1)
        counts[r["side"]] += 1
    return (sums["pos"] / counts["pos"] - sums["neg"] / counts["neg"]).float()


def _assert_matches(vec, ref):
    v = vec.get("response_avg")
    cos = torch.nn.functional.cosine_similarity(v.double(), ref.double(), dim=-1)
    assert cos.min().item() >= 0.9999, cos
    rel = ((v.norm(dim=-1) - ref.norm(dim=-1)).abs() / ref.norm(dim=-1)).max().item()
    assert rel <= 1e-3, rel


def test_run_folder_contents(run):
    out, vec, rec = run
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5 * 4  # sides x pairs x questions x samples
    needed = {
        "side",
        "instruction_index",
        "question",
        "system_prompt",
        "prompt",
        "response",
        "trait_score",
        "coherence_score",
        "kept",
    }
    assert needed <= set(rows[0])
    assert rec.n_kept >= CFG.min_kept and rec.n_kept == sum(r["kept"] for r in rows) // 2
    loaded = load_vector(out)
    assert set(loaded.vectors) == set(POOLINGS)
    assert loaded.get("response_avg").shape == (31, 576)
    assert torch.equal(loaded.get("prompt_last"), vec.get("prompt_last"))
    meta = json.loads((out / "vector.json").read_text())
    for key in (
        "model_id",
        "backend",
        "trait_hash",
        "judge",
        "judge_thresholds",
        "record",
        "config",
        "persona_lens_version",
        "date",
    ):
        assert key in meta
    # The mean trait score separates the sides the vector is built from.
    assert rec.mean_trait["pos"] > rec.mean_trait["neg"]


@pytest.mark.slow
def test_vector_matches_independent_hf_computation_both_backends(run, smol_folder, tmp_path):
    out, vec, _ = run
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    ref = _hf_reference_vector(smol_folder, rows)
    _assert_matches(vec, ref)
    # Same responses and judgments, hooked backend: only the activations are recomputed.
    copy = tmp_path / "hooked"
    shutil.copytree(out, copy)
    hooked = load_cached(smol_folder, "hooked")
    judge = make_judge("offline", cache_path=copy / "judgments.sqlite")
    vec_h, _ = extract(hooked, "evil", judge=judge, out=copy, config=CFG, progress=False)
    _assert_matches(vec_h, ref)


def test_rerun_reuses_everything_and_resumes(run, smol_folder, tmp_path):
    out, vec, _ = run
    copy = tmp_path / "resume"
    shutil.copytree(out, copy)
    lines = (copy / "responses.jsonl").read_text().splitlines()
    # A run killed mid-write: some rows done, the last one cut in half.
    (copy / "responses.jsonl").write_text("\n".join(lines[:25]) + "\n" + lines[25][:40])
    model = load_cached(smol_folder, "bridge")
    judge = _judge(model, copy)
    vec2, _ = extract(model, "evil", judge=judge, out=copy, config=CFG, progress=False)
    rows = [json.loads(line) for line in (copy / "responses.jsonl").read_text().splitlines()]
    old = [json.loads(line) for line in lines]
    assert [r["response"] for r in rows[:25]] == [r["response"] for r in old[:25]]
    assert len(rows) == len(old)


def test_other_settings_refused_unless_forced(run, smol_folder, tmp_path):
    out, _, _ = run
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    model = load_cached(smol_folder, "bridge")
    other = ExtractConfig(**{**CFG.__dict__, "seed": 1})
    with pytest.raises(ExtractionError, match="other settings.*--force"):
        extract(model, "evil", out=copy, config=other, progress=False)


def test_too_few_kept_names_the_fix(run, smol_folder, tmp_path):
    out, _, _ = run
    copy = tmp_path / "strict"
    shutil.copytree(out, copy)
    model = load_cached(smol_folder, "bridge")
    strict = ExtractConfig(**{**CFG.__dict__, "min_kept": 1000})
    with pytest.raises(ExtractionError, match="samples-per-question"):
        extract(model, "evil", out=copy, config=strict, progress=False)
