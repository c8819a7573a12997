"""Residual-stream activations at every layer, pooled per conversation.

One teacher-forced pass over prompt + response per batch with ``run_with_cache`` and a
``names_filter`` for the embedding and every block output: ``n_layers + 1`` layers, like HF
``hidden_states`` (the last one through the final norm, as HF does). Each batch is pooled
as soon as it is cached, so only one batch's cache is ever alive.

Batches are right-padded: attention is causal, so real tokens never see the padding after
them and positions start at 0 — every row gives exactly what it would give alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from persona_lens.chat import ChatPrompt
from persona_lens.models import hook_name
from persona_lens.vectors import POOLINGS


def _masks(convs: Sequence[ChatPrompt], n_pos: int) -> dict[str, Float[Tensor, "batch pos"]]:
    """Averaging weights over positions for each pooling (rows sum to 1)."""
    pos = torch.arange(n_pos)
    n_prompt = torch.tensor([c.n_prompt for c in convs])[:, None]
    length = torch.tensor([len(c.ids) for c in convs])[:, None]
    prompt = (pos < n_prompt).float()
    response = ((pos >= n_prompt) & (pos < length)).float()
    last = (pos == n_prompt - 1).float()
    out = {"prompt_avg": prompt, "prompt_last": last, "response_avg": response}
    return {k: m / m.sum(1, keepdim=True).clamp_min(1) for k, m in out.items()}


@torch.no_grad()
def _pooled_batch(
    model, convs: Sequence[ChatPrompt], poolings: Sequence[str]
) -> dict[str, Float[Tensor, "batch layers d_model"]]:
    n = model.cfg.n_layers
    names = [hook_name(layer, n) for layer in range(n + 1)]
    wanted = set(names)
    width = max(len(c.ids) for c in convs)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(convs), width), pad, dtype=torch.long)
    for i, c in enumerate(convs):
        ids[i, : len(c.ids)] = torch.tensor(c.ids)
    device = next(model.parameters()).device
    # stop_at_layer: a HookedTransformer then skips the unembedding, which nothing here needs.
    _, cache = model.run_with_cache(
        ids.to(device), names_filter=lambda h: h in wanted, stop_at_layer=n
    )
    masks = {k: m.to(device) for k, m in _masks(convs, width).items() if k in poolings}
    out = {k: [] for k in masks}
    for layer, name in enumerate(names):
        act = cache[name]
        if layer == n:  # HF's last hidden state is the final norm's output
            act = model.ln_final(act)
        act = act.float()
        for k, m in masks.items():
            out[k].append(torch.einsum("bp,bpd->bd", m, act))
    del cache
    return {k: torch.stack(v, dim=1).cpu() for k, v in out.items()}


def _check(convs: Sequence[ChatPrompt], poolings: Sequence[str]) -> None:
    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        raise ValueError(f"unknown pooling(s) {bad}; choose from {list(POOLINGS)}.")
    if "response_avg" in poolings and any(not c.has_response for c in convs):
        raise ValueError("response_avg needs a response in every conversation (got prompt only).")


def _batches(convs, batch_size, desc, progress):
    # Length-sorted batches pad little; callers restore order through the indices.
    order = sorted(range(len(convs)), key=lambda i: len(convs[i].ids))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return tqdm(chunks, desc=desc, disable=not progress, unit="batch")


def pooled_activations(
    model,
    convs: Sequence[ChatPrompt],
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Float[Tensor, "n layers d_model"]]:
    """Per-conversation pooled activations, float32, in input order."""
    _check(convs, poolings)
    n, d = model.cfg.n_layers + 1, model.cfg.d_model
    out = {k: torch.empty(len(convs), n, d) for k in poolings}
    for idx in _batches(convs, batch_size, "activations", progress):
        for k, v in _pooled_batch(model, [convs[i] for i in idx], poolings).items():
            out[k][idx] = v
    return out


def mean_activations(
    model,
    convs: Sequence[ChatPrompt],
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 8,
    progress: bool | str = False,
) -> dict[str, Float[Tensor, "layers d_model"]]:
    """Mean pooled activation over conversations, accumulated in float64 in constant memory."""
    _check(convs, poolings)
    if not convs:
        raise ValueError("no conversations to average.")
    n, d = model.cfg.n_layers + 1, model.cfg.d_model
    sums = {k: torch.zeros(n, d, dtype=torch.float64) for k in poolings}
    desc = progress if isinstance(progress, str) else "activations"
    for idx in _batches(convs, batch_size, desc, progress):
        for k, v in _pooled_batch(model, [convs[i] for i in idx], poolings).items():
            sums[k] += v.double().sum(0)
    return {k: (s / len(convs)).float() for k, s in sums.items()}
