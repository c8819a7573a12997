"""persona_lens: find, monitor and control character traits inside language models."""

from persona_lens.chat import ChatPrompt, format_chat
from persona_lens.models import hook_name, layer_index, load_model, model_info

__version__ = "0.1.0"

__all__ = [
    "ChatPrompt",
    "format_chat",
    "hook_name",
    "layer_index",
    "load_model",
    "model_info",
]
