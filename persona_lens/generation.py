"""Batched generation from chat prompts, on either backend, with hooks live throughout.

The bridge wraps the HF model in place, so HF's own ``generate`` (the fastest path) runs
through the bridged modules and every TransformerLens hook fires, KV cache included. A
HookedTransformer uses its own cached ``generate``. Prompts are left-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from persona_lens.chat import ChatPrompt
from persona_lens.models import hf_model_of


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                "temperature must be > 0 when sampling; use do_sample=False for greedy."
            )


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), left-padded to the longest sequence."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, n - len(s) :] = 1
    return ids, mask


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn (eos plus the template's end-of-turn markers)."""
    ids = {tokenizer.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None:
            ids.add(i)
    ids.discard(None)
    return sorted(ids)


def _trim(new_ids: list[int], stops: set[int]) -> list[int]:
    for j, t in enumerate(new_ids):
        if t in stops:
            return new_ids[:j]
    return new_ids


@torch.no_grad()
def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[list[int]]:
    """New token ids (end-of-turn token stripped) for each prompt, in order."""
    tok = model.tokenizer
    stops = stop_ids(tok)
    hf = hf_model_of(model)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    # Sort by length so each batch pads little; restore the order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gen = torch.Generator(device="cpu").manual_seed(params.seed)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(
        batches,
        desc=progress if isinstance(progress, str) else "generate",
        disable=not progress,
        unit="batch",
    )
    results: dict[int, list[int]] = {}
    for batch in bar:
        ids, mask = left_pad([prompts[i] for i in batch], tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        # One seed per batch, drawn from the run's seed: reproducible, and batches differ.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        if hf is not None:
            sample_kw = dict(temperature=params.temperature, top_p=params.top_p, top_k=0)
            seqs = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=params.max_new_tokens,
                do_sample=params.do_sample,
                pad_token_id=tok.pad_token_id,
                eos_token_id=stops,
                **(sample_kw if params.do_sample else {}),
            )
        else:
            seqs = model.generate(
                ids,
                max_new_tokens=params.max_new_tokens,
                do_sample=params.do_sample,
                temperature=params.temperature if params.do_sample else 1.0,
                top_p=params.top_p if params.do_sample and params.top_p < 1 else None,
                eos_token_id=stops,
                padding_side="left",
                prepend_bos=False,
                verbose=False,
                return_type="tokens",
                use_past_kv_cache=True,
            )
        for row, i in zip(seqs[:, ids.shape[1] :].tolist(), batch, strict=True):
            results[i] = _trim(row, set(stops))
    out = [results[i] for i in range(len(prompts))]
    return out


@dataclass
class Completion:
    prompt: ChatPrompt
    response: str
    response_ids: list[int]


def complete(
    model,
    prompts: Sequence[ChatPrompt],
    params: SamplingParams | None = None,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[Completion]:
    """Generate a response for each chat prompt; keeps the exact prompt and token ids."""
    params = params or SamplingParams()
    new = generate_ids(model, [p.prompt_ids for p in prompts], params, batch_size, progress)
    tok = model.tokenizer
    return [
        Completion(p, tok.decode(ids, skip_special_tokens=True), ids)
        for p, ids in zip(prompts, new, strict=True)
    ]


def chat(
    model,
    question: str,
    system: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    seed: int = 0,
) -> str:
    """One answer to one question (greedy by default): the quickest look at a model's voice,
    with any steering context around it in force."""
    from persona_lens.chat import format_chat

    prompt = format_chat(model.tokenizer, question, system=system)
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed)
    return complete(model, [prompt], params)[0].response
