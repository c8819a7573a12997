"""Steering and ablation as TransformerLens hook functions, with one context manager.

Five-minute tour::

    with steer(model, vector, layer=20, coef=1.5):            # h_20 += 1.5 * v_20
        completions = complete(model, prompts)
    with steer(model, vector, layer="all", coef=1.0):         # v_L - v_{L-1} at every layer
        ...
    with ablate(model, vector, layers="all"):                 # x <- x - (x . v_hat) v_hat
        ...
    with ablate(model, vector, layers=12, mean=True):         # x . v_hat := its neutral mean
        ...
    with clamp(model, vector, layer=20, value=0.0):           # x . v_hat := 0 at layer 20
        ...
    with intervene(model, vector, Intervention("add", 20, 1.5)):  # the same, as a value
        ...

The raw hook factories (:func:`add_hook`, :func:`ablate_hook`, :func:`clamp_hook`) work
alone with ``model.hooks(fwd_hooks=[(hook_name(L, n), fn)])``.

Positions (``positions=``):
- ``all``: every real token, at prefill and at every decode step;
- ``prompt``: prefill only (the prompt tokens);
- ``response``: the last prompt token at prefill, then every generated token (the paper).

Both generation paths use a KV cache, so a hook sees the whole (left-padded) prompt once,
then one position per new token. Padding positions are left untouched: the context managers
install a small tracker (:func:`track_passes`) that reads each forward pass's attention mask
and tells the hooks how many left pads each row has and whether the pass is the prefill.
A hook used without a tracker treats a pass longer than one token as a prefill with no
padding, which is right for unpadded prompts. A teacher-forced pass over prompt + response
(scoring, training) sets ``info.response_start`` (see :class:`PassInfo`) so that
``response`` covers the last prompt token and every response token, as in generation.

Coefficients are in units of the raw vector, as in the paper (``scale="raw"``). With
``scale="resid"`` the added vector is ``coef * typical_norm(L) * v_hat``, where the typical
norm is the median per-token residual norm at layer ``L`` on a few prompts
(:func:`resid_norms`), so that coefficients transfer between models.

Layer ``L`` is the output of block ``L-1`` (HF ``hidden_states[L]``); see ``models``. At the
last layer the hook sits before the final norm (HF's ``hidden_states[n]`` is after it).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from persona_lens.models import hf_model_of, hook_name, model_info
from persona_lens.vectors import POOLINGS, PersonaVector, VectorMismatchError

Positions = Literal["all", "prompt", "response"]
Kind = Literal["add", "ablate", "mean_ablate", "clamp"]
KINDS = ("add", "ablate", "mean_ablate", "clamp")
Scale = Literal["raw", "resid"]
Layers = int | Sequence[int] | Literal["all"]
VectorLike = PersonaVector | Float[Tensor, "layers d_model"] | Float[Tensor, " d_model"]
HookFn = Callable[[Float[Tensor, "batch pos d_model"], object], Float[Tensor, "batch pos d_model"]]
POSITIONS = ("all", "prompt", "response")


class SteeringError(ValueError):
    """A steering setting that cannot work; the message names the fix."""


# --------------------------------------------------------------------------------------
# Which positions a hook may touch in the current forward pass.


@dataclass
class PassInfo:
    """What hooks need to know about the forward pass now running (set by the tracker)."""

    n_pad: Int[Tensor, " batch"] | None = None  # left pads per row; None: no padding
    prefill: bool | None = None  # None: unknown, hooks infer it (more than one position)
    # Set by a caller that teacher-forces prompt + response in one pass (scoring, training):
    # the position of each row's first response token. Then "response" means the last
    # prompt token and every response token, and "prompt" the prompt tokens only.
    response_start: Int[Tensor, " batch"] | None = None


def _pass_from_mask(info: PassInfo, mask, n_new: int) -> None:
    if mask is None or not isinstance(mask, Tensor) or mask.ndim != 2:
        info.n_pad, info.prefill = None, None
        return
    info.prefill = mask.shape[1] == n_new  # no cached positions before this pass
    # Left pads are each row's leading zeros; they only exist in the prefill.
    n_pad = (mask.cumsum(1) == 0).sum(1)
    info.n_pad = n_pad if info.prefill and bool(n_pad.any()) else None


@contextmanager
def track_passes(model) -> Iterator[PassInfo]:
    """Keep a :class:`PassInfo` up to date for every forward pass of ``model``.

    Bridge: a pre-hook on the wrapped HF model, which gets the 2-D attention mask from both
    ``model(...)`` and HF ``generate``. Hooked: a pre-hook on block 0, which gets the mask
    that HookedTransformer builds (its ``generate`` calls ``forward`` directly, so a hook on
    the model itself would not fire).
    """
    info = PassInfo()
    hf = hf_model_of(model)
    if hf is not None:

        def pre(module, args, kwargs):
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            _pass_from_mask(info, kwargs.get("attention_mask"), x.shape[1] if x is not None else -1)

        handle = hf.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def pre(module, args, kwargs):
            resid = args[0] if args else kwargs["resid_pre"]
            _pass_from_mask(info, kwargs.get("attention_mask"), resid.shape[1])

        handle = model.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield info
    finally:
        handle.remove()


def _position_mask(
    x: Float[Tensor, "batch pos d_model"], positions: Positions, info: PassInfo | None
) -> Tensor | slice | None:
    """Where to act: a [batch, pos, 1] bool mask, a slice over pos, or None for nowhere."""
    n_pos = x.shape[1]
    prefill = info.prefill if info is not None and info.prefill is not None else n_pos > 1
    if not prefill:  # a decode step: the new token(s) are real in every row
        return None if positions == "prompt" else slice(None)
    start = info.response_start if info is not None else None
    if positions == "response" and start is None:  # the last position: the last prompt token
        return slice(n_pos - 1, n_pos)
    n_pad = info.n_pad if info is not None else None
    pos = torch.arange(n_pos, device=x.device)[None, :]
    if start is not None:
        start = start.to(x.device)[:, None]
        if positions == "response":
            return (pos >= start - 1)[..., None]
        if positions == "prompt":
            pad = n_pad.to(x.device)[:, None] if n_pad is not None else 0
            return ((pos >= pad) & (pos < start))[..., None]
    if n_pad is None:
        return slice(None)
    return (pos >= n_pad.to(x.device)[:, None])[..., None]


def _apply(x, where, new_fn):
    """x with new_fn(x) at the chosen positions, untouched elsewhere (a new tensor)."""
    if where is None:
        return x
    if isinstance(where, slice):
        if where == slice(None):
            return new_fn(x)
        out = x.clone()
        out[:, where] = new_fn(x[:, where])
        return out
    return torch.where(where, new_fn(x), x)


# --------------------------------------------------------------------------------------
# Hook factories: each returns fn(activation, hook) -> activation.


class _OnDevice:
    """A vector cast once to the activation's dtype and device (generation calls hooks often)."""

    def __init__(self, v: Tensor):
        self.v, self.cache = v, {}

    def __call__(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        if key not in self.cache:
            self.cache[key] = self.v.to(device=like.device, dtype=like.dtype)
        return self.cache[key]


def add_hook(
    vec: Float[Tensor, " d_model"],
    coef: float = 1.0,
    positions: Positions = "response",
    info: PassInfo | None = None,
) -> HookFn:
    """x <- x + coef * vec at ``positions``. ``coef = 0`` returns the logits bit for bit."""
    _check_positions(positions)
    delta = _OnDevice(coef * vec.detach().float())

    def hook(x, hook=None):
        return _apply(x, _position_mask(x, positions, info), lambda h: h + delta(h))

    return hook


def ablate_hook(
    direction: Float[Tensor, " d_model"],
    positions: Positions = "all",
    info: PassInfo | None = None,
) -> HookFn:
    """x <- x - (x . v_hat) v_hat, computed in float32 (bf16 alone leaves ~1e-2 behind)."""
    return clamp_hook(direction, 0.0, positions, info)


def clamp_hook(
    direction: Float[Tensor, " d_model"],
    value: float,
    positions: Positions = "response",
    info: PassInfo | None = None,
) -> HookFn:
    """Set the scalar projection x . v_hat to ``value``: x <- x + (value - x . v_hat) v_hat."""
    _check_positions(positions)
    v_hat = _OnDevice(_unit(direction))

    def set_projection(h):
        hf = h.float()
        u = v_hat(hf)
        return (hf + (value - hf @ u)[..., None] * u).to(h.dtype)

    def hook(x, hook=None):
        return _apply(x, _position_mask(x, positions, info), set_projection)

    return hook


def _unit(v: Tensor) -> Tensor:
    v = v.detach().double()  # float64: the unit vector must be exact to ~1e-16
    return (v / v.norm()).float()


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise SteeringError(
            f"unknown positions {positions!r}. Fix: use one of {', '.join(POSITIONS)} "
            "(response = last prompt token, then every generated token, as in the paper)."
        )


# --------------------------------------------------------------------------------------
# Vectors at layers, with every check a user needs.


def _n_layers(model) -> int:
    return model.cfg.n_layers


def resolve_layers(model, layers: Layers) -> list[int]:
    """A sorted list of valid layers; ``"all"`` means every block output (1..n_layers)."""
    n = _n_layers(model)
    if isinstance(layers, str):
        if layers != "all":
            raise SteeringError(f"layers={layers!r}: pass an int, a list of ints, or 'all'.")
        return list(range(1, n + 1))
    out = [layers] if isinstance(layers, int) else list(layers)
    if not out:
        raise SteeringError("no layers given. Fix: pass a layer, a list of layers, or 'all'.")
    for layer in out:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise SteeringError(
                f"layer {layer!r} is out of range for {model.cfg.model_name}: it has layers "
                f"0..{n} (0 = embedding output, L = output of block L-1). Fix: pick a layer "
                f"in 1..{n}; the paper steers near the middle (e.g. {max(1, round(n * 0.6))})."
            )
    return sorted(set(out))


def _check_row(v: Tensor, layer: int, what: str) -> Tensor:
    if not torch.isfinite(v).all():
        raise SteeringError(
            f"{what} at layer {layer} has NaN/inf entries. Fix: re-extract the vector "
            "(check that the pos and neg activations were finite)."
        )
    if float(v.norm()) == 0.0:
        raise SteeringError(
            f"{what} at layer {layer} is zero: it has no direction to steer or ablate along. "
            "Fix: pick another layer (layer 0 of a prompt_last vector is always zero) or "
            "re-extract the vector."
        )
    return v


def vectors_at(
    model,
    vector: VectorLike,
    layers: Layers,
    pooling: str = "response_avg",
    incremental: bool = False,
) -> dict[int, Float[Tensor, " d_model"]]:
    """{layer: vector row} after checking that ``vector`` fits ``model``.

    ``vector``: a PersonaVector, a raw ``[n_layers + 1, d_model]`` tensor, or one
    ``[d_model]`` direction used at every layer. ``incremental``: v_L - v_{L-1} per layer.
    """
    n, d = _n_layers(model), model.cfg.d_model
    if isinstance(vector, PersonaVector):
        if pooling not in vector.vectors:
            known = [p for p in POOLINGS if p in vector.vectors] or sorted(vector.vectors)
            raise SteeringError(
                f"unknown pooling {pooling!r}. Fix: use one of {', '.join(known)} "
                "(response_avg is the paper's)."
            )
        vector.check_model(model)  # VectorMismatchError on shape, a warning on another id
        table = vector.get(pooling)
    elif isinstance(vector, Tensor):
        table = vector.detach().float().cpu()
        if table.ndim == 1:
            table = table[None].expand(n + 1, -1)
            if incremental:
                raise SteeringError(
                    "incremental steering needs per-layer vectors. Fix: pass the PersonaVector "
                    "(or its [n_layers + 1, d_model] tensor), not a single direction."
                )
        if table.ndim != 2 or tuple(table.shape) != (n + 1, d):
            raise VectorMismatchError(
                f"vector shape {tuple(vector.shape)} does not fit {model.cfg.model_name} "
                f"(needs [{n + 1}, {d}] or [{d}]). Fix: extract a vector for this model."
            )
    else:
        raise SteeringError(f"vector must be a PersonaVector or a tensor, got {type(vector)}.")
    rows = resolve_layers(model, layers)
    what = "the vector"
    if incremental:
        table = table.clone()
        table[1:] = table[1:] - table[:-1]
        what = "the incremental vector v_L - v_(L-1)"
    return {layer: _check_row(table[layer], layer, what) for layer in rows}


# Residual statistics on a few neutral chat prompts, measured once per model.
_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
NORM_PROMPTS = (
    "What is your favourite season, and why?",
    "Explain how a bicycle works.",
    "Give me advice for a job interview tomorrow.",
    "Write two sentences about the ocean.",
)


@torch.no_grad()
def resid_stats(
    model, prompts: Sequence[str] | None = None
) -> tuple[Float[Tensor, " layers"], Float[Tensor, "layers d_model"]]:
    """(median per-token residual norm, mean residual) at each layer 0..n_layers over the
    tokens of a few chat prompts. The first token is left out: many models give it a huge
    norm (an attention sink) that says nothing about typical tokens."""
    if prompts is None and model in _STATS:
        return _STATS[model]
    from persona_lens.chat import format_chat

    n = _n_layers(model)
    names = [hook_name(layer, n) for layer in range(n + 1)]
    device = next(model.parameters()).device
    acts: list[list[Tensor]] = [[] for _ in names]
    for q in prompts or NORM_PROMPTS:
        ids = torch.tensor([format_chat(model.tokenizer, q).prompt_ids], device=device)
        _, cache = model.run_with_cache(ids, names_filter=lambda h: h in names)
        for i, name in enumerate(names):
            acts[i].append(cache[name][0, 1:].float().cpu())
    x = [torch.cat(a) for a in acts]
    stats = (torch.stack([a.norm(dim=-1).median() for a in x]), torch.stack([a.mean(0) for a in x]))
    if prompts is None:
        _STATS[model] = stats
    return stats


def resid_norms(model, prompts: Sequence[str] | None = None) -> Float[Tensor, " layers"]:
    """Typical residual norm at each layer 0..n_layers (see :func:`resid_stats`)."""
    return resid_stats(model, prompts)[0]


# --------------------------------------------------------------------------------------
# One value that describes an intervention, and the context managers.


@dataclass(frozen=True)
class Intervention:
    """What to do to the residual stream. Hashable; ``key`` names it in sweep files.

    kind ``add``: h_L += coef * v_L (``layers="all"``: the incremental vectors at every
    layer); ``ablate``: remove the v_L direction, x <- x - (x . v_hat) v_hat; ``mean_ablate``:
    set x . v_hat to its mean on neutral prompts (see :func:`ablate`); ``clamp``: set the
    projection to ``value``.
    """

    kind: Kind
    layers: int | tuple[int, ...] | str
    coef: float = 1.0
    positions: Positions = "response"
    pooling: str = "response_avg"
    scale: Scale = "raw"
    value: float = 0.0  # clamp only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SteeringError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}.")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        _check_positions(self.positions)
        if self.scale not in ("raw", "resid"):
            raise SteeringError(f"scale must be 'raw' or 'resid', got {self.scale!r}.")
        if not math.isfinite(self.coef) or not math.isfinite(self.value):
            raise SteeringError("coef and value must be finite numbers.")

    @property
    def key(self) -> str:
        layers = (
            self.layers if isinstance(self.layers, (int, str)) else "-".join(map(str, self.layers))
        )
        amount = f"coef={self.coef:g}" if self.kind == "add" else ""
        amount = f"value={self.value:g}" if self.kind == "clamp" else amount
        parts = [self.kind, f"L={layers}", amount, self.positions, self.pooling]
        if self.scale != "raw":
            parts.append(f"scale={self.scale}")
        return "|".join(p for p in parts if p)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d


def hooks_for(
    model, vector: VectorLike, iv: Intervention, info: PassInfo | None = None
) -> list[tuple[str, HookFn]]:
    """The (hook name, hook function) pairs that carry out ``iv`` on ``model``."""
    n = _n_layers(model)
    incremental = iv.kind == "add" and iv.layers == "all"
    if incremental and iv.scale == "resid":
        raise SteeringError(
            "scale='resid' rescales one layer's unit vector; it has no meaning for the "
            "incremental vectors of layers='all'. Fix: use scale='raw' or list the layers."
        )
    rows = vectors_at(model, vector, iv.layers, iv.pooling, incremental)
    norms = resid_norms(model) if iv.scale == "resid" else None
    hooks = []
    for layer, v in rows.items():
        if iv.kind == "add":
            if norms is not None:  # coef in units of the layer's typical residual norm
                v = _unit(v) * float(norms[layer])
            fn = add_hook(v, iv.coef, iv.positions, info)
        elif iv.kind == "ablate":
            fn = ablate_hook(v, iv.positions, info)
        elif iv.kind == "mean_ablate":  # keep the neutral mean: the stream stays on-distribution
            mean = float(resid_stats(model)[1][layer] @ _unit(v))
            fn = clamp_hook(v, mean, iv.positions, info)
        else:
            fn = clamp_hook(v, iv.value, iv.positions, info)
        hooks.append((hook_name(layer, n), fn))
    return hooks


@contextmanager
def intervene(model, vector: VectorLike, *ivs: Intervention | None) -> Iterator[PassInfo]:
    """Apply one or more interventions (None entries are skipped) for the ``with`` block."""
    with ExitStack() as stack:
        info = stack.enter_context(track_passes(model))
        hooks = [h for iv in ivs if iv is not None for h in hooks_for(model, vector, iv, info)]
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        yield info


def steer(
    model,
    vector: VectorLike,
    layer: Layers,
    coef: float = 1.0,
    *,
    positions: Positions = "response",
    pooling: str = "response_avg",
    scale: Scale = "raw",
):
    """``with steer(model, vector, layer=20, coef=1.5): ...`` adds ``coef * v_L``.

    ``layer``: one layer, a list (each gets its own v_L), or ``"all"`` (every block output
    gets the incremental v_L - v_{L-1}). ``scale="resid"``: coef in units of the layer's
    typical residual norm along v_hat (see :func:`resid_norms`).
    """
    return intervene(
        model, vector, Intervention("add", _layers(layer), coef, positions, pooling, scale)
    )


def ablate(
    model,
    vector: VectorLike,
    layers: Layers = "all",
    *,
    positions: Positions = "all",
    pooling: str = "response_avg",
    mean: bool = False,
):
    """``with ablate(model, vector): ...`` removes the direction at ``layers`` (default every
    block output, each with its own v_L; pass a 1-D tensor for one direction everywhere).

    ``mean=True`` (mean ablation) sets x . v_hat to its mean over neutral prompts instead of
    0. Use it when typical activations project far from 0 on the vector: then zeroing the
    projection is itself a large push along v (e.g. SmolLM2's evil vector, whose neutral mean
    projection is about -0.9 |v| at layer 12) and raises the trait instead of removing it.
    """
    kind = "mean_ablate" if mean else "ablate"
    return intervene(model, vector, Intervention(kind, _layers(layers), 0.0, positions, pooling))


def clamp(
    model,
    vector: VectorLike,
    layer: Layers,
    value: float,
    *,
    positions: Positions = "response",
    pooling: str = "response_avg",
):
    """``with clamp(model, vector, 20, value=0.0): ...`` pins x . v_hat to ``value``."""
    return intervene(
        model, vector, Intervention("clamp", _layers(layer), 0.0, positions, pooling, value=value)
    )


def _layers(layers: Layers) -> int | tuple[int, ...] | str:
    return layers if isinstance(layers, (int, str)) else tuple(layers)


def describe(model, vector: VectorLike, iv: Intervention) -> dict:
    """A record of what an intervention adds, for logs: layers, norms, hook names."""
    info = model_info(model)
    hooks = hooks_for(model, vector, iv)
    rows = vectors_at(model, vector, iv.layers, iv.pooling, iv.kind == "add" and iv.layers == "all")
    return dict(
        iv.to_dict(),
        model_id=info.model_id,
        hooks=[name for name, _ in hooks],
        vector_norms={layer: round(float(v.norm()), 4) for layer, v in rows.items()},
    )
