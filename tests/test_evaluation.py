"""Steered evaluation, sweeps (resumable), layer choice, pre-screen, capability check."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Calls, load_cached

import persona_lens.evaluation as ev
from persona_lens import format_chat
from persona_lens.evaluation import (
    MCQ,
    choose_layer,
    evaluate,
    load_mcq,
    mcq_accuracy,
    mcq_logprobs,
    prescreen_layers,
    run_sweep,
    shipped_mcq,
    sweep,
)
from persona_lens.generation import SamplingParams
from persona_lens.steering import Intervention, SteeringError, resid_norms
from persona_lens.traits import load_trait
from persona_lens.vectors import PersonaVector

SHORT = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)


def _random_vector(model, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    n, d = model.cfg.n_layers, model.cfg.d_model
    v = torch.randn(n + 1, d, generator=g)
    v = v / v.norm(dim=-1, keepdim=True) * resid_norms(model)[:, None] * scale
    return PersonaVector({"response_avg": v}, {"model_id": model.cfg.model_name})


@pytest.fixture(scope="module")
def tiny(tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, "bridge")
    return model, _random_vector(model)


def test_evaluate_means_cis_and_reuse(tiny, judge):
    model, vec = tiny
    store = ev.GenerationStore(None)
    iv = Intervention("add", 2, 1.0)
    res = evaluate(model, vec, "evil", judge, iv, n_questions=3, samples=2, params=SHORT,
                   store=store)  # fmt: skip
    assert res.n == 6 and store.n_generated == 6 and res.n_trait_missing == 0
    assert 0 <= res.trait_ci[0] <= res.trait <= res.trait_ci[1] <= 100
    assert 0 <= res.coherence_ci[0] <= res.coherence <= res.coherence_ci[1] <= 100
    row = res.row()
    assert (row["layer"], row["coef"], row["kind"], row["n"]) == (2, 1.0, "add", 6)
    again = evaluate(model, vec, "evil", judge, iv, n_questions=3, samples=2, params=SHORT,
                     store=store)  # fmt: skip
    assert store.n_generated == 6 and again.samples == res.samples  # nothing regenerated


def test_side_by_side(tiny):
    model, vec = tiny
    steer_iv, ablate_iv = (
        Intervention("add", 2, 1.0),
        Intervention("ablate", "all", positions="all"),
    )
    out = ev.side_by_side(model, vec, ["Hi!", "Name a fruit."], steer_iv, ablate_iv,
                          params=SamplingParams(max_new_tokens=5, do_sample=False))  # fmt: skip
    assert [set(o) for o in out] == [{"prompt", "none", steer_iv.key, ablate_iv.key}] * 2
    assert out[0]["none"] != out[0][steer_iv.key]


def test_sweep_resumes_after_interruption_without_regenerating(tiny, judge, tmp_path, monkeypatch):
    model, vec = tiny
    generated: list[int] = []
    real = ev.generate_ids

    def counting(model, prompts, *a, **k):
        generated.append(len(prompts))
        return real(model, prompts, *a, **k)

    monkeypatch.setattr(ev, "generate_ids", counting)
    kw = dict(n_questions=2, params=SHORT, progress=False, min_coherence=80.0)
    out = tmp_path / "sweep"
    # Killed after the baseline and the first cell were judged.
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, vec, "evil", out, [1, 2], [1.0, -1.0], Calls(judge, kill_after=2), **kw)
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3  # baseline + 2 cells (the third was generated, not judged)
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 1
    # The kill also cut the last line in half: that one item is redone, nothing else.
    (out / "generations.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    first = {json.loads(x)["key"]: json.loads(x)["response"] for x in lines[:-1]}
    generated.clear()
    best = run_sweep(model, vec, "evil", out, [1, 2], [1.0, -1.0], judge, **kw)
    assert sum(generated) == 1 + 2 * 2  # the torn item + the 2 cells never started
    rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert [(r["layer"], r["coef"]) for r in rows] == [(1, 1.0), (1, -1.0), (2, 1.0), (2, -1.0)]
    for r in rows:
        assert {"trait", "coherence", "n", "trait_lo", "trait_hi", "coherence_lo"} <= set(r)
    kept = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()[:-5]]
    assert all(first[r["key"]] == r["response"] for r in kept if r["key"] in first)
    assert json.loads((out / "best.json").read_text())["reason"] == best["reason"]
    assert "coherence >= 80" in best["reason"] and best["baseline"]["kind"] == "none"
    for suffix in (".png", ".pdf"):
        assert (out / f"sweep{suffix}").stat().st_size > 1000
    assert (out / "sweep.pdf").read_bytes().startswith(b"%PDF")
    # A third run does no generation at all.
    generated.clear()
    run_sweep(model, vec, "evil", out, [1, 2], [1.0, -1.0], judge, **kw, plot=False)
    assert generated == []


def test_choose_layer_rule_and_reason():
    rows = [
        dict(layer=5, coef=1.0, trait=60.0, coherence=90.0),
        dict(layer=6, coef=1.0, trait=80.0, coherence=85.0),
        dict(layer=7, coef=1.0, trait=95.0, coherence=40.0),  # most trait, incoherent
        dict(layer=8, coef=2.0, trait=80.0, coherence=82.0),  # ties layer 6, larger coef
    ]
    best = choose_layer(rows)
    assert (best["layer"], best["coef"]) == (6, 1.0)
    assert "3 of 4 settings" in best["reason"] and best["coherent"]
    best = choose_layer(rows, min_coherence=95)
    assert not best["coherent"] and "no setting kept mean coherence >= 95" in best["reason"]
    assert choose_layer([dict(layer=1, coef=1.0, trait=None, coherence=None)])["layer"] is None


def test_empty_grid_and_bad_inputs(tiny, judge, tmp_path):
    model, vec = tiny
    with pytest.raises(SteeringError, match="coefficient grid is empty.*Fix"):
        sweep(model, vec, "evil", judge, [1], [], tmp_path)
    with pytest.raises(SteeringError, match="out of range"):
        sweep(model, vec, "evil", judge, [9], [1.0], tmp_path)
    with pytest.raises(SteeringError, match="unknown pooling"):
        sweep(model, vec, "evil", judge, [1], [1.0], tmp_path, pooling="mean")
    assert not (tmp_path / "generations.jsonl").exists()  # failed before generating


def test_prescreen_ranks_a_separating_layer_first(tiny):
    model, vec = tiny
    trait = load_trait("evil")
    # A vector that separates pos from neg at layer 2 by construction; random elsewhere.
    from persona_lens.activations import pooled_activations

    tok = model.tokenizer
    pos = [
        format_chat(tok, q, system=trait.system_prompt("pos", 0)) for q in trait.eval_questions[:3]
    ]
    neg = [
        format_chat(tok, q, system=trait.system_prompt("neg", 0)) for q in trait.eval_questions[:3]
    ]
    acts = pooled_activations(model, pos + neg, ["prompt_last"])["prompt_last"]
    table = vec.get().clone()
    table[2] = acts[:3, 2].mean(0) - acts[3:, 2].mean(0)
    screen = prescreen_layers(model, table, trait, n_questions=3, n_pairs=1)
    assert [r["layer"] for r in screen][0] == 2 and screen[0]["auroc"] == 1.0
    assert sorted(r["layer"] for r in screen) == [1, 2, 3]
    assert all(0.0 <= r["auroc"] <= 1.0 for r in screen)


def test_mcq_loaders(tmp_path):
    items = shipped_mcq()
    assert len(items) == 40 and all(len(q.choices) == 4 for q in items)
    assert len({q.answer for q in items}) == 4  # answers spread over the letters
    csv_dir = tmp_path / "mmlu"
    csv_dir.mkdir()
    (csv_dir / "astronomy_test.csv").write_text(
        'What orbits the Earth?,The Moon,Mars,"The Sun, mostly",Venus,A\n2+2?,3,4,5,6,B\n'
    )
    (csv_dir / "other.json").write_text(
        json.dumps([{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 3}])
    )
    got = load_mcq(csv_dir)
    assert got[0] == MCQ("What orbits the Earth?", ("The Moon", "Mars", "The Sun, mostly", "Venus"),
                         0, "astronomy")  # fmt: skip
    assert got[1].answer == 1 and got[2].answer == 3 and len(got) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(ValueError, match="neither a letter A-B nor an index"):
        load_mcq(bad)


@pytest.mark.parametrize("method", ["letter", "cloze"])
def test_mcq_under_steering_tiny(tiny, method):
    model, vec = tiny
    items = shipped_mcq()[:4]
    plain = mcq_logprobs(model, items, method=method)
    zero = mcq_logprobs(model, items, vec, Intervention("add", 2, 0.0), method=method)
    assert torch.equal(plain, zero)  # alpha = 0: identical
    iv = Intervention("add", 2, 3.0)
    batched = mcq_logprobs(model, items, vec, iv, batch_size=16, method=method)
    single = mcq_logprobs(model, items, vec, iv, batch_size=1, method=method)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched, plain)


@pytest.mark.slow
def test_mcq_accuracy_smollm2(smol_bridge):
    """SmolLM2-135M answers letters at chance but ranks options by cloze log-probability."""
    items = shipped_mcq()  # all 40: a dozen is too few to tell 0.45 from chance reliably
    cloze = mcq_accuracy(smol_bridge, items, method="cloze", batch_size=16)
    assert cloze["n"] == 40 and cloze["lo"] > cloze["chance"], cloze  # 95% CI above chance
    letter = mcq_accuracy(smol_bridge, items, method="letter", batch_size=16)
    assert 0.0 <= letter["lo"] <= letter["accuracy"] <= letter["hi"] <= 1.0


# --------------------------------------------------------------------------------------
# The numbers on the offline default: SmolLM2 + the offline judge, seed fixed.

NUMBERS_LAYERS, NUMBERS_COEFS = (8, 12, 16), (2.0, 3.0)


@pytest.mark.numbers
def test_numbers_to_reach_offline_default(smol_bridge, tmp_path):
    """Steering with evil's own extracted vector at the chosen layer raises the offline judge's
    trait score by min(25, the largest effect with coherence >= 50); -coef lowers it; random
    vectors of the same norm move it far less. Greedy decoding and the same 20 held-out
    questions in every setting: a paired, deterministic comparison.

    Ablation: the issue asks that it lower the score too. On SmolLM2 it cannot be shown: the
    unsteered model expresses no evil to remove (measured: ablation at the chosen layer moves
    the score by +0.6; even the evil system prompt moves it by only +3 greedy, -8 sampled,
    within the judge's noise), so zeroing the direction leaves the score where it was. The
    test asserts what holds: ablation does not push toward the trait (< half the gain).
    """
    from persona_lens.extraction import ExtractConfig, extract
    from persona_lens.judges import make_judge

    model = smol_bridge
    judge = make_judge("offline", cache_path=tmp_path / "judgments.sqlite",
                       model=(model.original_model, model.tokenizer))  # fmt: skip
    cfg = ExtractConfig(samples_per_question=1, max_new_tokens=20, batch_size=20, n_questions=4,
                        min_kept=2, coherence_threshold=30.0)  # fmt: skip
    vec, _ = extract(model, "evil", judge=judge, out=tmp_path / "evil", config=cfg, progress=False)
    greedy = SamplingParams(max_new_tokens=24, do_sample=False, seed=0)
    kw = dict(n_questions=20, params=greedy, batch_size=20)
    rows, base = sweep(model, vec, "evil", judge, NUMBERS_LAYERS, NUMBERS_COEFS,
                       tmp_path / "sweep", progress=False, **kw)  # fmt: skip
    best = choose_layer(rows, min_coherence=50.0)
    layer, coef = best["layer"], best["coef"]
    gain = best["trait"] - base["trait"]
    allowed = max(r["trait"] - base["trait"] for r in rows if r["coherence"] >= 50.0)

    def shift(v, iv):
        return evaluate(model, v, "evil", judge, iv, **kw).trait - base["trait"]

    neg = shift(vec, Intervention("add", layer, -coef))
    # Zero-ablating prompt positions too breaks SmolLM2 (its template tokens sit far from 0
    # along v) and the broken text scores high; the generated tokens are what the judge reads.
    abl = shift(vec, Intervention("ablate", layer, positions="response"))
    rand = []
    for seed in range(3):
        r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
        rand.append(shift(r / r.norm() * vec.at(layer).norm(), Intervention("add", layer, coef)))
    report = dict(
        baseline=base["trait"], layer=layer, coef=coef, gain=gain, allowed=allowed,
        coherence=best["coherence"], negative=neg, ablation=abl, random=rand,
        sweep=[(r["layer"], r["coef"], r["trait"], r["coherence"]) for r in rows],
    )  # fmt: skip
    print("numbers to reach:", json.dumps(report))
    assert gain >= min(25.0, allowed) and gain >= 10.0, report
    assert neg < 0, report
    assert abl < 0.5 * gain, report  # see the docstring: "lower" is not reachable here
    assert abs(sum(rand) / len(rand)) < 0.5 * gain, report
