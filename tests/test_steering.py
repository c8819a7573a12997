"""Steering hooks: exactness, agreement with a plain HF hook, padding, decode steps, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import load_cached
from transformers import AutoModelForCausalLM

from persona_lens import format_chat, hook_name
from persona_lens.generation import SamplingParams, generate_ids, left_pad, stop_ids
from persona_lens.steering import (
    Intervention,
    SteeringError,
    ablate,
    add_hook,
    clamp,
    hooks_for,
    resid_norms,
    resid_stats,
    steer,
    track_passes,
)
from persona_lens.vectors import PersonaVector, VectorMismatchError

BACKENDS = ("bridge", "hooked")
QUESTIONS = ("Name a colour.", "Tell me a fact about the sea, please.", "Why is the sky blue?")
LAYER = 2  # output of block 1 of the 3-block tiny models


def _vector(model, seed: int = 0, scale: float = 6.0) -> PersonaVector:
    """A random per-layer vector a few times the typical residual norm: it changes greedy text."""
    g = torch.Generator().manual_seed(seed)
    n, d = model.cfg.n_layers, model.cfg.d_model
    v = torch.randn(n + 1, d, generator=g)
    norms = resid_norms(model)
    v = v / v.norm(dim=-1, keepdim=True) * norms[:, None] * scale
    return PersonaVector({"response_avg": v}, {"model_id": model.cfg.model_name})


def _prompts(model, questions=QUESTIONS):
    return [format_chat(model.tokenizer, q, system="Be brief.").prompt_ids for q in questions]


def _padded(model, prompts):
    ids, mask = left_pad(prompts, model.tokenizer.pad_token_id)
    return ids, mask


GREEDY = SamplingParams(max_new_tokens=10, do_sample=False)


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_folder):
    """An independent HF model (not wrapped by any bridge) for the reference hook."""
    return AutoModelForCausalLM.from_pretrained(tiny_llama_folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_is_bit_identical(backend, tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, backend)
    vec = _vector(model)
    ids, mask = _padded(model, _prompts(model))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        for layer, positions in ((LAYER, "all"), (LAYER, "response"), ("all", "prompt")):
            with steer(model, vec, layer, coef=0.0, positions=positions):
                got = model(ids, attention_mask=mask)
            assert torch.equal(got, ref), (layer, positions)
        # ... and through cached generation too
        plain = generate_ids(model, _prompts(model), GREEDY, batch_size=3)
        with steer(model, vec, LAYER, coef=0.0, positions="all"):
            assert generate_ids(model, _prompts(model), GREEDY, batch_size=3) == plain


def _hf_reference(hf, tok, prompt, layer, delta, positions):
    """Greedy HF generate with a forward hook on decoder layer layer-1 adding delta."""

    def hook(module, args, out):
        if positions == "all" or out.shape[1] == 1:  # decode steps: every new token
            return out + delta
        out = out.clone()
        out[:, -1] += delta  # prefill, "response": the last prompt token only
        return out

    handle = hf.model.layers[layer - 1].register_forward_hook(hook)
    try:
        seq = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
    finally:
        handle.remove()
    stops = set(stop_ids(tok))
    out = seq[0, len(prompt) :].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", ["response", "all"])
def test_matches_independent_hf_forward_hook(backend, positions, tiny_llama_folder, hf_llama):
    model = load_cached(tiny_llama_folder, backend)
    vec, coef = _vector(model, seed=1), 1.5
    prompts = _prompts(model)
    plain = generate_ids(model, prompts, GREEDY, batch_size=1)
    with steer(model, vec, LAYER, coef=coef, positions=positions):
        ours = generate_ids(model, prompts, GREEDY, batch_size=1)
    assert ours != plain  # the vector is strong enough that the test means something
    delta = coef * vec.at(LAYER)
    for p, got in zip(prompts, ours, strict=True):
        assert got == _hf_reference(hf_llama, model.tokenizer, p, LAYER, delta, positions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_one_by_one_with_left_padding(backend, tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, backend)
    vec = _vector(model, seed=2)
    prompts = _prompts(model)
    assert len({len(p) for p in prompts}) == 3  # really padded
    for positions in ("response", "all"):
        with steer(model, vec, LAYER, coef=1.0, positions=positions):
            batched = generate_ids(model, prompts, GREEDY, batch_size=3)
            single = generate_ids(model, prompts, GREEDY, batch_size=1)
        assert batched == single, positions
    with ablate(model, vec, "all"):
        assert generate_ids(model, prompts, GREEDY, batch_size=3) == generate_ids(
            model, prompts, GREEDY, batch_size=1
        )


def _probe(model, layer, store):
    """A hook registered after the steering hooks: it sees what they returned."""
    return (hook_name(layer, model.cfg.n_layers), lambda x, hook: store.append(x.clone()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_untouched_and_only_chosen_positions_move(backend, tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, backend)
    vec = _vector(model, seed=3)
    ids, mask = _padded(model, _prompts(model))
    pad = mask == 0
    assert pad.any()
    before: list = []
    with torch.no_grad(), model.hooks(fwd_hooks=[_probe(model, LAYER, before)]):
        model(ids, attention_mask=mask)
    for positions in ("all", "prompt", "response"):
        after: list = []
        with torch.no_grad(), steer(model, vec, LAYER, coef=1.0, positions=positions):
            with model.hooks(fwd_hooks=[_probe(model, LAYER, after)]):
                model(ids, attention_mask=mask)
        diff = after[0] - before[0]
        assert diff[pad].abs().max() == 0, positions  # padding untouched
        moved = diff.norm(dim=-1) > 0
        if positions == "response":
            assert moved[:, -1].all() and not moved[:, :-1].any()
        else:
            assert torch.equal(moved, ~pad)
            torch.testing.assert_close(diff[~pad], vec.at(LAYER).expand(int((~pad).sum()), -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablation_leaves_no_projection(backend, tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, backend)
    vec = _vector(model, seed=4)
    n = model.cfg.n_layers
    ids, mask = _padded(model, _prompts(model))
    pad = mask == 0
    seen = {layer: [] for layer in range(1, n + 1)}
    plain = {layer: [] for layer in range(1, n + 1)}
    with torch.no_grad():
        with model.hooks(fwd_hooks=[_probe(model, layer, plain[layer]) for layer in plain]):
            model(ids, attention_mask=mask)
        with ablate(model, vec, "all"):
            with model.hooks(fwd_hooks=[_probe(model, layer, seen[layer]) for layer in seen]):
                model(ids, attention_mask=mask)
    for layer in range(1, n + 1):
        x, v_hat = seen[layer][0], vec.unit(layer)
        proj = (x @ v_hat)[~pad].abs()
        assert (proj / x[~pad].norm(dim=-1)).max() < 1e-4, layer
        assert (plain[layer][0] @ v_hat)[~pad].abs().max() > 1e-3  # there was something to remove
    # Pads pass through the first ablated layer untouched (later, HF lets fully masked pad
    # rows attend to real tokens, so they differ for reasons that have nothing to do with us).
    assert torch.equal(seen[1][0][pad], plain[1][0][pad])
    # One layer only, and clamping to a value
    with torch.no_grad(), clamp(model, vec, LAYER, value=3.0, positions="all"):
        got: list = []
        with model.hooks(fwd_hooks=[_probe(model, LAYER, got)]):
            model(ids, attention_mask=mask)
    torch.testing.assert_close(
        (got[0] @ vec.unit(LAYER))[~pad], torch.full((int((~pad).sum()),), 3.0)
    )
    # Mean ablation: the projection becomes its mean over neutral prompts
    mean = float(resid_stats(model)[1][LAYER] @ vec.unit(LAYER))
    with torch.no_grad(), ablate(model, vec, LAYER, mean=True):
        got = []
        with model.hooks(fwd_hooks=[_probe(model, LAYER, got)]):
            model(ids, attention_mask=mask)
    torch.testing.assert_close(
        (got[0] @ vec.unit(LAYER))[~pad], torch.full((int((~pad).sum()),), mean)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_fires_once_per_decode_step(backend, tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, backend)
    vec = _vector(model, seed=5)
    prompts = _prompts(model)
    calls: list[tuple[int, bool | None]] = []
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    with track_passes(model) as info:  # the raw hook factory, used alone with model.hooks
        fn = add_hook(vec.at(LAYER), 1.0, "response", info)

        def counting(x, hook):
            calls.append((x.shape[1], info.prefill))
            return fn(x, hook)

        with model.hooks(fwd_hooks=[(hook_name(LAYER, model.cfg.n_layers), counting)]):
            out = generate_ids(model, prompts, params, batch_size=3)
    # Generation runs until every row has stopped (its stop token is one more step) or the cap.
    steps = max(min(len(r) + 1, params.max_new_tokens) for r in out)
    assert calls[0] == (max(len(p) for p in prompts), True)
    assert calls[1:] == [(1, False)] * (steps - 1)


def test_resid_scale_and_incremental_layers(tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, "bridge")
    vec = _vector(model, seed=6)
    n = model.cfg.n_layers
    norms = resid_norms(model)
    assert norms.shape == (n + 1,) and (norms > 0).all()
    ids = torch.tensor([_prompts(model)[0]])
    before: list = []
    after: list = []
    with torch.no_grad():
        with model.hooks(fwd_hooks=[_probe(model, LAYER, before)]):
            model(ids)
        with steer(model, vec, LAYER, coef=0.5, positions="all", scale="resid"):
            with model.hooks(fwd_hooks=[_probe(model, LAYER, after)]):
                model(ids)
    added = (after[0] - before[0])[0]
    torch.testing.assert_close(added.norm(dim=-1), torch.full((ids.shape[1],), 0.5 * norms[LAYER]))
    # layers="all": block outputs 1..n get v_L - v_{L-1}; they add up to v_n - v_0
    hooks = hooks_for(model, vec, Intervention("add", "all", 1.0, "all"))
    assert [h for h, _ in hooks] == [hook_name(layer, n) for layer in range(1, n + 1)]
    x = torch.zeros(1, 2, model.cfg.d_model)
    total = sum(fn(x, None) for _, fn in hooks)
    torch.testing.assert_close(total[0, 0], vec.at(n) - vec.at(0))
    # A list of layers: each its own v_L
    hooks = hooks_for(model, vec, Intervention("add", (1, 3), 2.0, "all"))
    torch.testing.assert_close(hooks[1][1](x, None)[0, 0], 2.0 * vec.at(3))


def test_bad_inputs_name_the_fix(tiny_qwen_folder):
    model = load_cached(tiny_qwen_folder, "bridge")
    n, d = model.cfg.n_layers, model.cfg.d_model
    good = _vector(model)
    other = PersonaVector({"response_avg": torch.randn(n + 1, d + 1)}, {"model_id": "x/other"})
    with pytest.raises(VectorMismatchError, match="Extract a vector for this model"):
        steer(model, other, LAYER).__enter__()
    deeper = PersonaVector({"response_avg": torch.randn(n + 3, d)}, {"model_id": "x/other"})
    with pytest.raises(VectorMismatchError, match="layers"):
        steer(model, deeper, LAYER).__enter__()
    with pytest.raises(VectorMismatchError, match="extract a vector"):
        steer(model, torch.randn(n + 1, d + 1), LAYER).__enter__()
    renamed = PersonaVector(good.vectors, {"model_id": "someone/else"})
    with pytest.warns(UserWarning, match="extracted from someone/else"):
        with steer(model, renamed, LAYER):
            pass
    with pytest.raises(SteeringError, match=r"out of range.*Fix: pick a layer in 1..3"):
        steer(model, good, n + 1).__enter__()
    with pytest.raises(SteeringError, match="out of range"):
        ablate(model, good, [-1]).__enter__()
    with pytest.raises(SteeringError, match="unknown pooling 'mean'.*response_avg"):
        steer(model, good, LAYER, pooling="mean").__enter__()
    with pytest.raises(SteeringError, match="unknown positions"):
        steer(model, good, LAYER, positions="last").__enter__()
    nan = good.get().clone()
    nan[LAYER, 0] = float("nan")
    with pytest.raises(SteeringError, match="NaN.*re-extract"):
        steer(model, nan, LAYER).__enter__()
    zero = good.get().clone()
    zero[LAYER] = 0
    with pytest.raises(SteeringError, match="zero.*pick another layer"):
        ablate(model, zero, LAYER).__enter__()
    with pytest.raises(SteeringError, match="scale='raw'"):
        steer(model, good, "all", scale="resid").__enter__()
    # Nothing stays registered after a failed or finished context.
    ids = torch.tensor([_prompts(model)[0]])
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        ref = model(ids)
        with steer(model, good, LAYER, coef=1.0, positions="all"):
            assert not torch.equal(model(ids), ref)
        assert torch.equal(model(ids), ref)
