"""Shared fixtures: tiny random models built offline from configs, and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# A Llama-3.1-style template: it writes BOS itself, so the tokenizer must not add another.
LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A Qwen-style template: a default system prompt when the conversation has none.
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by "
    "Alibaba Cloud. You are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def smol_folder():
    from persona_lens.models import smollm2_folder

    return smollm2_folder()


def _tokenizer(smol_folder, template: str, bos: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_folder)
    tok.chat_template = template
    if bos:
        tok.add_special_tokens({"bos_token": bos})
    return tok


@pytest.fixture(scope="session")
def tiny_qwen_folder(tmp_path_factory, smol_folder):
    """Qwen2-shaped: grouped-query attention, non-zero q/k/v biases, untied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer(smol_folder, QWEN_TEMPLATE, None)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1e6,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smol_folder):
    """Llama-3.1-shaped: llama3 rope scaling, grouped-query attention, a BOS-writing template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(smol_folder, LLAMA31_TEMPLATE, "<|endoftext|>")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-l31")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_folders(smol_folder, tiny_qwen_folder, tiny_llama_folder):
    return {"qwen2": tiny_qwen_folder, "llama31": tiny_llama_folder, "smollm2": smol_folder}


_loaded: dict = {}


def load_cached(folder, backend):
    """Load each (folder, backend) once per session: SmolLM2 on hooked takes seconds."""
    from persona_lens import load_model
    from persona_lens.models import smollm2_folder

    key = (str(folder), backend)
    if key not in _loaded:
        name = "smollm2-135m" if folder == smollm2_folder() else str(folder)
        _loaded[key] = load_model(name, backend=backend, device="cpu")
    return _loaded[key]


@pytest.fixture(scope="session")
def smol_bridge(smol_folder):
    return load_cached(smol_folder, "bridge")


@pytest.fixture
def judge(tmp_path, smol_bridge):
    """The shipped offline judge (MiniLM trait score, SmolLM2 coherence), cached per test."""
    from persona_lens.judges import make_judge

    return make_judge("offline", cache_path=tmp_path / "judgments.sqlite",
                      model=(smol_bridge.original_model, smol_bridge.tokenizer))  # fmt: skip


class Calls:
    """A real judge with its calls counted. ``kill_after=n``: the call after the n-th raises
    KeyboardInterrupt, as when a run is killed half way."""

    def __init__(self, judge, kill_after: int | None = None):
        self.judge, self.kill_after, self.calls = judge, kill_after, 0
        self.name = judge.name

    def score(self, *args, **kwargs):
        self.calls += 1
        if self.kill_after is not None and self.calls > self.kill_after:
            raise KeyboardInterrupt
        return self.judge.score(*args, **kwargs)


def unreachable_judge():
    """A real API judge with nothing listening at its address: every score comes back missing."""
    from persona_lens.judges import OpenAIJudge

    return OpenAIJudge(base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=1,
                       backoff=0.01, timeout=1.0)  # fmt: skip
