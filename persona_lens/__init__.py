"""persona_lens: find, monitor and control character traits inside language models."""

from persona_lens import ops
from persona_lens.chat import ChatPrompt, format_chat
from persona_lens.extraction import ExtractConfig, extract
from persona_lens.generation import SamplingParams, chat
from persona_lens.judges import make_judge
from persona_lens.models import hook_name, layer_index, load_model, model_info
from persona_lens.monitoring import project_last_token
from persona_lens.steering import ablate, clamp, steer
from persona_lens.traits import Trait, list_traits, load_trait
from persona_lens.vectors import PersonaVector, load_vector

__version__ = "0.1.0"

__all__ = [
    "ChatPrompt",
    "ExtractConfig",
    "PersonaVector",
    "SamplingParams",
    "Trait",
    "ablate",
    "chat",
    "clamp",
    "extract",
    "format_chat",
    "hook_name",
    "layer_index",
    "list_traits",
    "load_model",
    "load_trait",
    "load_vector",
    "make_judge",
    "model_info",
    "ops",
    "project_last_token",
    "steer",
]
