"""Both backends reproduce HF exactly: logits, every residual layer, greedy cached generation."""

from __future__ import annotations

import pytest
import torch
from conftest import load_cached
from transformers import AutoModelForCausalLM, AutoTokenizer

from persona_lens import format_chat, hook_name, layer_index, model_info
from persona_lens.generation import SamplingParams, generate_ids
from persona_lens.models import ModelLoadError, check_layer, default_device_dtype, resolve

CASES = [(m, b) for m in ("qwen2", "llama31", "smollm2") for b in ("bridge", "hooked")]


@pytest.fixture(scope="module")
def hf_models(model_folders):
    out = {}
    for name, folder in model_folders.items():
        tok = AutoTokenizer.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        )
        out[name] = (hf.eval(), tok)
    return out


def _prompt_ids(tok, question="What is the capital of France?"):
    return format_chat(tok, question, system="You are a concise assistant.").ids


@pytest.mark.parametrize("name,backend", CASES)
def test_logits_and_residual_stream_match_hf(name, backend, model_folders, hf_models):
    hf, tok = hf_models[name]
    model = load_cached(model_folders[name], backend)
    ids = torch.tensor([_prompt_ids(tok)])
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        n = model.cfg.n_layers
        names = [hook_name(layer, n) for layer in range(n + 1)]
        logits, cache = model.run_with_cache(ids, names_filter=lambda h: h in names)
    diff = (logits - ref.logits).abs().max().item()
    if backend == "bridge":
        assert diff == 0.0
    else:
        assert diff < 1e-3
    tol = 0.0 if backend == "bridge" else 1e-4
    for layer in range(n):  # layers 0..n-1: raw residual stream
        got = cache[hook_name(layer, n)]
        scale = ref.hidden_states[layer].abs().max().item()
        assert (got - ref.hidden_states[layer]).abs().max().item() <= tol * max(scale, 1.0)
    # Layer n: HF applies the final norm to the last block's output.
    normed = model.ln_final(cache[hook_name(n, n)])
    assert torch.allclose(normed, ref.hidden_states[n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,backend", CASES)
def test_greedy_cached_generation_matches_hf(name, backend, model_folders, hf_models):
    hf, tok = hf_models[name]
    model = load_cached(model_folders[name], backend)
    prompts = [
        _prompt_ids(tok, q) for q in ("Name a colour.", "Tell me a fact about the sea, please.")
    ]
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    ours = generate_ids(model, prompts, params, batch_size=2)
    from persona_lens.generation import stop_ids

    for p, got in zip(prompts, ours, strict=True):
        ref = hf.generate(
            torch.tensor([p]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stop_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
        want = ref[0, len(p) :].tolist()
        want = [t for t in want][: len(got) + 1]
        assert got == want[: len(got)] and (len(got) == 12 or want[len(got)] in stop_ids(tok))


@pytest.mark.parametrize("name", ["qwen2", "llama31"])
def test_hooked_weights_need_no_copy_per_forward(name, model_folders):
    """HookedTransformer calls .contiguous() on rearranged weights at every forward; the
    loader stores them so that those calls return the weights themselves (no copy)."""
    model = load_cached(model_folders[name], "hooked")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    k = attn._parameters.get("_W_K", attn._parameters.get("W_K"))
    used = {
        "W_Q": attn.W_Q.transpose(1, 2),
        "W_K": k.transpose(1, 2),
        "W_O": attn.W_O.permute(2, 0, 1),
        "W_in": mlp.W_in.T,
        "W_out": mlp.W_out.T,
        "W_U": model.unembed.W_U.T,
    }
    for what, w in used.items():
        assert w.contiguous().data_ptr() == w.data_ptr(), what


def test_model_info_and_name(smol_bridge):
    info = model_info(smol_bridge)
    assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (info.backend, info.n_layers, info.d_model) == ("bridge", 30, 576)


def test_chat_boundary_exact_and_no_double_bos(model_folders):
    for folder in model_folders.values():
        tok = AutoTokenizer.from_pretrained(folder)
        cp = format_chat(tok, "Hi there?", system="Be brief.", answer="Hello! How can I help?")
        assert cp.text == cp.prompt_text + "Hello! How can I help?"
        assert tok.decode(cp.ids[cp.n_prompt :]) == "Hello! How can I help?"
        assert tok.decode(cp.ids[: cp.n_prompt]) == cp.prompt_text
        if tok.bos_token_id is not None and "bos_token" in (tok.chat_template or ""):
            assert cp.ids[0] == tok.bos_token_id and cp.ids[1] != tok.bos_token_id
    qwen_tok = AutoTokenizer.from_pretrained(model_folders["qwen2"])
    assert "You are Qwen" in format_chat(qwen_tok, "Hi").text  # the template's default
    assert "You are Qwen" not in format_chat(qwen_tok, "Hi", system="Custom.").text
    shots = format_chat(qwen_tok, "Q3", system="S", shots=[("Q1", "A1"), ("Q2", "A2")])
    assert shots.text.index("A1") < shots.text.index("A2") < shots.text.index("Q3")


def test_layer_conventions():
    assert hook_name(0, 30) == "blocks.0.hook_resid_pre"
    assert hook_name(20, 30) == "blocks.19.hook_resid_post"
    assert layer_index(19, "decoder_layer_output") == 20
    assert layer_index(20, "hf_hidden_states") == 20
    with pytest.raises(ValueError, match="0..30"):
        check_layer(31, 30)


def test_bad_input_errors():
    with pytest.raises(ModelLoadError, match="Aliases: .*local folder"):
        resolve("no-such-model")
    with pytest.raises(ModelLoadError, match="float32 or bfloat16"):
        default_device_dtype("cpu", torch.float16)
    with pytest.raises(ModelLoadError, match="Choose one of"):
        default_device_dtype("cpu", "float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="device='cpu'"):
            default_device_dtype("cuda", None)
