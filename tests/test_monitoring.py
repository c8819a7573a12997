"""Monitoring: projections against plain HF, generation-time vs teacher-forced, the statistics
against scipy/sklearn, the offline token HTML, the experiment runner, and the bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import Calls, load_cached, unreachable_judge

import persona_lens.monitoring as mon
from persona_lens import format_chat
from persona_lens.generation import SamplingParams, generate_ids
from persona_lens.monitoring import (
    Condition,
    MonitoringError,
    TokenExample,
    classify,
    correlation,
    generate_monitored,
    project,
    run_monitor,
    summarize,
)
from persona_lens.plots_monitoring import fetchable_urls, write_tokens_html
from persona_lens.traits import load_trait
from persona_lens.vectors import PersonaVector, VectorMismatchError

QUESTIONS = ["How do I deal with a noisy neighbour?", "Tell me a fact.", "Why is the sky blue?"]
SYSTEMS = [None, "You are an evil assistant. Be cruel.", "You are a kind assistant."]


def _vector(model, seed=0) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.n_layers + 1, model.cfg.d_model, generator=g)
    return PersonaVector({"response_avg": v}, {"model_id": model.cfg.model_name})


def _prompts(tok):
    return [format_chat(tok, q, system=s) for q in QUESTIONS for s in SYSTEMS]


def _teacher_forced(tok, prompts, gens):
    return [
        format_chat(
            tok,
            p.messages[-1]["content"],
            system=p.messages[0]["content"] if p.messages[0]["role"] == "system" else None,
            answer_ids=g.response_ids,
        )
        for p, g in zip(prompts, gens, strict=True)
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these batches are tiny, and on a shared 2-core machine two OpenMP
    threads spin against other jobs (SmolLM2 decoding measured 25x slower than with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, "bridge")
    return model, _vector(model)


# --------------------------------------------------------------------------------------
# Projections


def test_projection_matches_plain_hf_hidden_states(tiny, tiny_qwen_folder):
    """One batched, right-padded run_with_cache pass vs HF output_hidden_states, one
    conversation at a time, in float64 plain torch on an independently loaded HF model."""
    from transformers import AutoModelForCausalLM

    model, vec = tiny
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen_folder, dtype=torch.float32).eval()
    tok = model.tokenizer
    answers = ["Ignore them.", "The sky is blue because of Rayleigh scattering, mostly.", "No."]
    convs = [
        format_chat(tok, q, system=s, answer=a)
        for q, a in zip(QUESTIONS, answers, strict=True)
        for s in SYSTEMS[:2]
    ]
    n = model.cfg.n_layers
    for layer in (0, 2, n):  # embedding output, a block output, the last (after final norm)
        pr = project(model, convs, vec, layer, batch_size=4)
        v = vec.vectors["response_avg"][layer].double()
        v_hat = v / v.norm()
        for i, c in enumerate(convs):
            with torch.no_grad():
                hs = hf(torch.tensor([c.ids]), output_hidden_states=True).hidden_states
            ref = hs[layer][0].double() @ v_hat
            rel = (pr.tokens[i].double() - ref).abs().max() / ref.abs().max()
            assert rel <= 1e-5, (layer, i, float(rel))
            tol = 1e-5 * float(ref.abs().max())  # relative to the row's scale
            assert float(pr.prompt_last[i]) == pytest.approx(float(ref[c.n_prompt - 1]), abs=tol)
            assert float(pr.response_avg[i]) == pytest.approx(
                float(ref[c.n_prompt :].mean()), abs=tol
            )


def test_projection_matches_hf_on_smollm2(smol_bridge):
    model = smol_bridge
    from persona_lens.models import hf_model_of

    vec = _vector(model, seed=3)
    c = format_chat(model.tokenizer, QUESTIONS[0], system=SYSTEMS[1], answer="Make them pay.")
    pr = project(model, [c], vec, 20)
    with torch.no_grad():
        hs = hf_model_of(model)(torch.tensor([c.ids]), output_hidden_states=True).hidden_states
    v = vec.vectors["response_avg"][20].double()
    ref = hs[20][0].double() @ (v / v.norm())
    assert float((pr.tokens[0].double() - ref).abs().max() / ref.abs().max()) <= 1e-5


# --------------------------------------------------------------------------------------
# Monitoring during generation


@pytest.mark.parametrize("layer", [1, 3])
def test_generation_monitor_equals_teacher_forced(tiny, layer):
    model, vec = tiny
    tok = model.tokenizer
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=7, seed=1)
    gens = generate_monitored(model, prompts, vec, layer, params, batch_size=4)
    pr = project(model, _teacher_forced(tok, prompts, gens), vec, layer, batch_size=5)
    for i, g in enumerate(gens):
        tf = pr.tokens[i]
        n_p = len(g.prompt_tokens)
        assert n_p == prompts[i].n_prompt and len(g.response_tokens) == len(g.response_ids)
        scale = float(tf.abs().max())
        assert g.prompt_last == pytest.approx(float(pr.prompt_last[i]), abs=1e-5 * scale)
        got = torch.tensor(g.prompt_tokens + g.response_tokens)
        seen = ~torch.isnan(got)
        # Only the last token of a response cut at max_new_tokens is never fed back.
        assert int((~seen).sum()) == (1 if len(g.response_ids) == 7 else 0)
        assert torch.allclose(got[seen], tf[seen], atol=1e-5 * scale, rtol=0)


def test_monitor_does_not_change_generation(tiny):
    model, vec = tiny
    prompts = _prompts(model.tokenizer)[:4]
    params = SamplingParams(max_new_tokens=6, seed=5)
    gens = generate_monitored(model, prompts, vec, 2, params, batch_size=8)
    plain = generate_ids(model, [p.prompt_ids for p in prompts], params, batch_size=8)
    assert [g.response_ids for g in gens] == plain


def test_generation_monitor_smollm2_with_early_stops(smol_bridge):
    """The real model stops early on some rows: every response token is then seen."""
    model = smol_bridge
    tok = model.tokenizer
    vec = _vector(model, seed=4)
    prompts = [
        format_chat(tok, "Reply with one word: yes or no?"),  # greedy: "Yes." and stop
        format_chat(tok, "Say hi.", system=SYSTEMS[1]),
    ]
    gens = generate_monitored(model, prompts, vec, 15, SamplingParams(8, do_sample=False))
    pr = project(model, _teacher_forced(tok, prompts, gens), vec, 15)
    assert sorted(len(g.response_ids) < 8 for g in gens) == [False, True]
    for i, g in enumerate(gens):
        got = torch.tensor(g.prompt_tokens + g.response_tokens)
        seen = ~torch.isnan(got)
        assert int((~seen).sum()) == (1 if len(g.response_ids) == 8 else 0)
        scale = float(pr.tokens[i].abs().max())
        assert torch.allclose(got[seen], pr.tokens[i][seen], atol=1e-4 * scale, rtol=0)


# --------------------------------------------------------------------------------------
# Statistics against scipy / sklearn


def test_correlation_matches_scipy():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)
    c = correlation(x, y, n_boot=400)
    ref = pearsonr(x, y)
    assert c.r == pytest.approx(ref.statistic, abs=1e-12)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-6)
    lo, hi = ref.confidence_interval(0.95)  # Fisher z: the bootstrap CI should be close
    assert c.ci_low < c.r < c.ci_high
    assert abs(c.ci_low - lo) < 0.1 and abs(c.ci_high - hi) < 0.1


def test_auroc_tpr_and_thresholds_match_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.normal(size=200) + 1.2 * labels, 1)  # rounded: ties included
    fpr, tpr, thr = mon.roc_points(scores, labels)
    f2, t2, th2 = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert mon.tpr_at_fpr(scores, labels, 0.05) == pytest.approx(t2[f2 <= 0.05].max())
    res = classify(scores, np.where(labels, 80.0, 20.0), n_boot=200)
    assert res.auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert res.auroc_ci[0] < res.auroc < res.auroc_ci[1]
    assert res.n_calib + res.n_test == 200 and res.n_pos == int(labels.sum())
    # The held-out thresholds do what they were chosen for, within sampling noise.
    assert res.test_fpr_at_5fpr <= 0.15 and res.test_tpr > res.test_fpr
    j = tpr - fpr
    assert mon.choose_threshold(scores, labels) == pytest.approx(thr[int(np.argmax(j))])


def test_summary_within_and_between_conditions():
    rng = np.random.default_rng(2)
    rows = []
    for ci, c in enumerate(["a", "b", "c", "d", "e"]):
        for k in range(8):
            p = ci + rng.normal(scale=0.3)
            rows.append(dict(condition=c, projection=p, trait_score=float(20 * ci + 5 * k % 13),
                             response="x"))  # fmt: skip
    s = summarize(rows, n_boot=200)
    assert s.overall.r > 0.8 and s.between_means.r > 0.9
    assert len(s.conditions) == 5 and all(c.correlation is not None for c in s.conditions)
    assert s.classifier is not None and s.classifier.auroc > 0.8
    text = json.dumps(s.to_json())
    assert "NaN" not in text and "Infinity" not in text


def test_summary_prompt_means_average_samples_of_one_prompt():
    """The projection is one number per prompt; with several samples, r over prompts compares
    it with each prompt's mean score (scipy on the means), and it is absent with one sample."""
    from scipy.stats import pearsonr

    rng = np.random.default_rng(3)
    rows, prompt_x, prompt_y = [], [], []
    for c in ("a", "b", "c"):
        for q in range(6):
            p = rng.normal()
            ys = [float(50 + 10 * p + rng.normal(scale=30)) for _ in range(4)]
            rows += [dict(condition=c, question=f"q{q}", projection=p, trait_score=y,
                          response="x") for y in ys]  # fmt: skip
            prompt_x.append(p)
            prompt_y.append(np.mean(ys))
    s = summarize(rows, n_boot=200)
    assert s.prompt_means.n == 18
    assert s.prompt_means.r == pytest.approx(pearsonr(prompt_x, prompt_y)[0], abs=1e-9)
    assert s.prompt_means.r > s.overall.r  # averaging samples removes their noise
    one = summarize([r for i, r in enumerate(rows) if i % 4 == 0], n_boot=200)
    assert one.prompt_means is None


# --------------------------------------------------------------------------------------
# Token views


def test_tokens_html_is_offline_and_uses_circuitsvis(tmp_path, monkeypatch):
    evil = ['<img src="https://x.org/a.png">', "</script><!--"]  # model output is not HTML
    ex = [
        TokenExample("first", ["Hello", " world", "\n", "<b>&", *evil], [0.1, -2, 0.5, 3, 1, 2]),
        TokenExample("second", ["Bye", "!"], [1.0, 1.5], 10.0),
    ]
    page = write_tokens_html(ex, tmp_path / "t.html", title="demo").read_text()
    assert fetchable_urls(page) == []
    assert "unpkg" not in page and "sourceMappingURL" not in page
    assert page.count("var CircuitsVis=") == 1  # the bundle once, not once per example
    assert page.count("CircuitsVis.ColoredTokens") == 2
    bundle_end = page.index("</script>")
    after = page[bundle_end:]
    assert after.count("<script>") == after.count("</script>") - 1 == 2  # each render call
    assert "<img" not in after and "<b>" not in after and "/>" not in after
    # The check itself catches what circuitsvis's CDN form would load.
    from circuitsvis.tokens import colored_tokens

    assert fetchable_urls(colored_tokens(["a"], [1.0]).cdn_src)
    assert fetchable_urls('<script src="https://x.org/a.js"></script>')
    # Without the bundle: plain coloured spans, still nothing to fetch.
    monkeypatch.setattr("persona_lens.plots_monitoring.circuitsvis_bundle", lambda: None)
    page = write_tokens_html(ex, tmp_path / "s.html").read_text()
    assert fetchable_urls(page) == [] and "&lt;b&gt;&amp;" in page and "<script" not in page


# --------------------------------------------------------------------------------------
# The experiment runner


def test_run_monitor_writes_everything_and_resumes(tiny, judge, tmp_path, monkeypatch):
    model, vec = tiny
    out = tmp_path / "mon"
    kw = dict(n_questions=2, max_new_tokens=5, batch_size=8, n_boot=100, progress=False)
    judge = Calls(judge)
    run = run_monitor(model, vec, "evil", 2, "spectrum", out, judge, **kw)
    lines = (out / "projections.jsonl").read_text().splitlines()
    assert len(lines) == 8 * 2  # 8 system prompts x 2 questions x 1 sample, one row each
    row = json.loads(lines[0])
    for k in ("condition", "question", "projection", "response", "trait_score", "coherence_score"):
        assert k in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["r"] is not None and not math.isnan(summary["overall"]["r"])
    assert len(summary["conditions"]) == 8 and "auroc" in json.dumps(summary)
    for f in ("monitor.png", "monitor.pdf", "tokens.html", "tokens.png", "tokens.pdf"):
        assert (out / f).stat().st_size > 0, f
    assert fetchable_urls((out / "tokens.html").read_text()) == []
    assert run.summary.overall.r == pytest.approx(summary["overall"]["r"])

    # Killed after 11 rows had been generated and none judged: the rerun generates only the
    # last 5 and judges all 16.
    gen_rows = [dict(json.loads(x), trait_score=None, judged=False) for x in lines[:11]]
    (out / "projections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    counted = []
    real = mon.generate_ids

    def counting(model, prompts, *a, **k):
        counted.append(len(prompts))
        return real(model, prompts, *a, **k)

    monkeypatch.setattr(mon, "generate_ids", counting)
    run2 = run_monitor(model, vec, "evil", 2, "spectrum", out, judge, **kw)
    assert sum(counted) == 5 and len(run2.rows) == 16
    assert [r["response"] for r in run2.rows[:11]] == [r["response"] for r in run.rows[:11]]
    # A finished run: nothing generated, nothing judged.
    counted.clear()
    calls = judge.calls
    run_monitor(model, vec, "evil", 2, "spectrum", out, judge, **kw)
    assert counted == [] and judge.calls == calls
    with pytest.raises(MonitoringError, match="other settings"):
        run_monitor(model, vec, "evil", 1, "spectrum", out, judge, **kw)


def test_manyshot_from_extraction_responses(tiny, judge, tmp_path):
    model, vec = tiny
    trait = load_trait("evil")
    src = tmp_path / "responses.jsonl"
    rows = [
        dict(side="pos", question=q, response=f"Hurt them {i}.", kept=i % 2 == 0, trait_score=i)
        for i, q in enumerate(trait.extract_questions[:6])
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = mon.manyshot_examples(trait, 4, src)
    assert ex[0][1] == "Hurt them 4." and len(ex) == 4  # kept first, highest score first
    run = run_monitor(
        model, vec, trait, 2, "manyshot", tmp_path / "ms", judge, shot_counts=(0, 2, 4),
        shots_source=src, n_questions=2, n_samples=2, max_new_tokens=4, n_boot=100,
        progress=False,
    )  # fmt: skip
    lens = {r["condition"]: r["n_prompt_tokens"] for r in run.rows if r["question_index"] == 0}
    assert list(lens) == ["0 shots", "2 shots", "4 shots"]
    assert lens["0 shots"] < lens["2 shots"] < lens["4 shots"]
    assert len(run.rows) == 3 * 2 * 2
    with pytest.raises(MonitoringError, match="only 4"):
        mon.manyshot_conditions(ex, (0, 5))


# --------------------------------------------------------------------------------------
# Bad input


def test_vector_model_mismatch(tiny, judge, smol_bridge, tmp_path):
    model, _ = tiny
    other = _vector(smol_bridge)  # 30 layers x 576: not the tiny model's
    c = format_chat(model.tokenizer, "Hi", answer="Hello")
    with pytest.raises(VectorMismatchError, match="layers x d_model"):
        project(model, [c], other, 2)
    with pytest.raises(VectorMismatchError):
        generate_monitored(model, [c], other, 2, SamplingParams(2))
    with pytest.raises(VectorMismatchError, match="out of range"):
        project(model, [c], _vector(model), 9)
    with pytest.raises(VectorMismatchError, match="does not fit"):
        project(model, [c], torch.ones(7), 1)
    with pytest.raises(VectorMismatchError):
        run_monitor(model, other, "evil", 2, "spectrum", tmp_path / "x", judge)
    assert not (tmp_path / "x").exists()  # failed before any work


def test_condition_without_responses():
    rows = [dict(condition=c, projection=float(i), trait_score=float(i), response="ok")
            for i, c in enumerate("aabbbcc")]  # fmt: skip
    rows += [dict(condition="d", projection=1.0, trait_score=None, response="")]
    with pytest.raises(MonitoringError, match="condition 'd' has no responses"):
        summarize(rows)
    with pytest.raises(MonitoringError, match="condition 'zz' has no responses"):
        summarize(rows[:-1], conditions=["a", "b", "zz"])


def test_all_scores_missing_says_the_judge_failed(tiny, judge, tmp_path, monkeypatch):
    rows = [
        dict(condition="a", projection=float(i), trait_score=None, response="r") for i in range(9)
    ]
    with pytest.raises(MonitoringError, match="judge failed") as e:
        summarize(rows)
    assert "nan" not in str(e.value).lower()
    model, vec = tiny
    with pytest.raises(MonitoringError, match="judge failed"):
        run_monitor(model, vec, "evil", 2, "spectrum", tmp_path / "m", unreachable_judge(),
                    n_questions=1, max_new_tokens=2, progress=False)  # fmt: skip
    # The generations are kept: a rerun with a working judge only judges.
    assert len((tmp_path / "m" / "projections.jsonl").read_text().splitlines()) == 8
    monkeypatch.setattr(mon, "generate_ids", lambda *a, **k: pytest.fail("generated again"))
    run = run_monitor(model, vec, "evil", 2, "spectrum", tmp_path / "m", judge,
                      n_questions=1, max_new_tokens=2, n_boot=50, progress=False)  # fmt: skip
    assert run.summary.n_scored == 8 and run.summary.overall.n == 8


def test_too_few_points_and_constant_scores():
    with pytest.raises(MonitoringError, match="too few"):
        correlation([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0])
    with pytest.raises(MonitoringError, match="r is undefined"):
        correlation([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    rows = [dict(condition="a", projection=float(i), trait_score=10.0 * i, response="r")
            for i in range(3)]  # fmt: skip
    with pytest.raises(MonitoringError, match="too few"):
        summarize(rows)
    with pytest.raises(MonitoringError, match="at least 2 responses scoring"):
        classify([1, 2, 3, 4, 5, 6], [90, 10, 10, 10, 10, 10])
    # Within one condition the same problems become notes, never NaN.
    rows = [dict(condition="ab"[i % 2], projection=float(i), trait_score=float(10 * (i % 2) + i),
                 response="r") for i in range(8)]  # fmt: skip
    s = summarize(rows, n_boot=50)
    assert all(c.correlation is None and "too few" in c.note for c in s.conditions)
    assert "nan" not in json.dumps(s.to_json()).lower()


def test_bad_experiment_and_samples(tiny, judge, tmp_path):
    model, vec = tiny
    with pytest.raises(MonitoringError, match="experiment must be"):
        run_monitor(model, vec, "evil", 2, "bogus", tmp_path / "b", judge)
    with pytest.raises(MonitoringError, match="n_samples"):
        run_monitor(model, vec, "evil", 2, "spectrum", tmp_path / "b", judge, n_samples=0)
    with pytest.raises(MonitoringError, match="no conversations"):
        project(model, [], vec, 1)
    assert Condition("x").shots == ()
