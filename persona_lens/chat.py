"""Chat formatting in one place: the exact text and token ids a model sees.

Prompt and response are tokenized separately and concatenated, so the boundary between
them is exact and the response tokens are the ones the model would generate after the
prompt. The chat template supplies every special token (Llama-3.1's adds its own BOS), so
the tokenizer never adds more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ChatPrompt:
    """One templated conversation. ``ids[:n_prompt]`` is the prompt, the rest the response."""

    text: str  # exactly the text that was tokenized (prompt + response)
    ids: list[int]
    n_prompt: int
    messages: list[dict] = field(default_factory=list)

    @property
    def prompt_text(self) -> str:
        return self.text[: len(self.text) - len(self.response_text)]

    @property
    def response_text(self) -> str:
        return self.messages[-1]["content"] if self.has_response else ""

    @property
    def has_response(self) -> bool:
        return len(self.ids) > self.n_prompt

    @property
    def prompt_ids(self) -> list[int]:
        return self.ids[: self.n_prompt]


def build_messages(
    question: str,
    system: str | None = None,
    answer: str | None = None,
    shots: Sequence[tuple[str, str]] = (),
) -> list[dict]:
    """System prompt (None: the template's own default, e.g. Qwen's), few-shot (user,
    assistant) turns, the user question, and optionally the assistant answer."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for q, a in shots:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def format_chat(
    tokenizer,
    question: str,
    system: str | None = None,
    answer: str | None = None,
    shots: Sequence[tuple[str, str]] = (),
    answer_ids: Sequence[int] | None = None,
) -> ChatPrompt:
    """Template a conversation. ``answer_ids`` (e.g. generated tokens) overrides tokenizing
    ``answer``, so teacher forcing sees exactly the tokens that were sampled."""
    if tokenizer.chat_template is None:
        raise ValueError(
            "This tokenizer has no chat template; persona_lens needs an instruct/chat model."
        )
    msgs = build_messages(question, system, None, shots)
    prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if answer is None and answer_ids is None:
        return ChatPrompt(prompt_text, list(prompt_ids), len(prompt_ids), msgs)
    if answer_ids is None:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    elif answer is None:
        answer = tokenizer.decode(answer_ids)
    msgs = msgs + [{"role": "assistant", "content": answer}]
    return ChatPrompt(
        prompt_text + answer, list(prompt_ids) + list(answer_ids), len(prompt_ids), msgs
    )
