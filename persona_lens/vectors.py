"""PersonaVector: per-layer mean-difference vectors with their provenance, and their files.

On disk a vector is a folder with ``vector.safetensors`` (one ``[n_layers + 1, d_model]``
float32 tensor per pooling: ``response_avg``, ``prompt_avg``, ``prompt_last``) and
``vector.json`` (provenance). Row ``L`` is persona_lens layer ``L`` (see ``models``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from persona_lens import ops

POOLINGS = ("response_avg", "prompt_avg", "prompt_last")


class VectorMismatchError(ValueError):
    """A vector does not fit the model or layer it is used with."""


@dataclass
class PersonaVector:
    vectors: dict[str, Float[Tensor, "layers d_model"]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.vectors:
            raise ValueError("a PersonaVector needs at least one pooling.")
        shapes = {tuple(v.shape) for v in self.vectors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"every pooling must be one [layers, d_model] tensor, got {shapes}.")
        self.vectors = {k: v.detach().float().cpu() for k, v in self.vectors.items()}

    # -- shape and identity --------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of transformer blocks (rows - 1: row 0 is the embedding output)."""
        return next(iter(self.vectors.values())).shape[0] - 1

    @property
    def d_model(self) -> int:
        return next(iter(self.vectors.values())).shape[1]

    @property
    def model_id(self) -> str | None:
        return self.meta.get("model_id")

    @property
    def trait(self) -> str | None:
        return self.meta.get("trait")

    # -- access ----------------------------------------------------------------------
    def get(self, pooling: str = "response_avg") -> Float[Tensor, "layers d_model"]:
        if pooling not in self.vectors:
            raise KeyError(
                f"pooling {pooling!r} is not in this vector; it has {sorted(self.vectors)}."
            )
        return self.vectors[pooling]

    def at(self, layer: int, pooling: str = "response_avg") -> Float[Tensor, " d_model"]:
        """The raw (unnormalized) vector at one layer."""
        if not isinstance(layer, int) or not 0 <= layer <= self.n_layers:
            raise VectorMismatchError(
                f"layer {layer!r} is out of range: this vector has layers 0..{self.n_layers}."
            )
        v = self.get(pooling)[layer]
        if not torch.isfinite(v).all():
            raise VectorMismatchError(f"the vector at layer {layer} has NaN/inf entries.")
        if v.norm() == 0:
            raise VectorMismatchError(
                f"the vector at layer {layer} is zero: it has no direction. Pick another layer."
            )
        return v

    def unit(self, layer: int, pooling: str = "response_avg") -> Float[Tensor, " d_model"]:
        return ops.unit(self.at(layer, pooling))

    def incremental(self, pooling: str = "response_avg") -> Float[Tensor, "layers d_model"]:
        """v_L - v_{L-1} at every layer, for steering at all layers at once."""
        return ops.incremental(self.get(pooling))

    def norms(self, pooling: str = "response_avg") -> Float[Tensor, " layers"]:
        return self.get(pooling).norm(dim=-1)

    def check_model(self, model) -> None:
        """Raise if this vector cannot belong to ``model``; warn if only the name differs."""
        cfg = model.cfg
        if (self.n_layers, self.d_model) != (cfg.n_layers, cfg.d_model):
            raise VectorMismatchError(
                f"this vector has {self.n_layers} layers x d_model {self.d_model} "
                f"(from {self.model_id or 'an unknown model'}), but the model "
                f"{cfg.model_name} has {cfg.n_layers} x {cfg.d_model}. Extract a vector "
                "for this model with persona_lens.extract."
            )
        if self.model_id and self.model_id != cfg.model_name:
            warnings.warn(
                f"vector was extracted from {self.model_id} but is used with {cfg.model_name}.",
                stacklevel=2,
            )

    # -- files -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.vectors.items()}, folder / "vector.safetensors"
        )
        (folder / "vector.json").write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
        return folder

    def to_gguf(self, path: str | Path, pooling: str = "response_avg", scale: float = 1.0) -> Path:
        """Export as a llama.cpp control vector (``--control-vector``).

        llama.cpp adds ``direction.{il}`` to the output of block ``il`` (0-indexed, il >= 1),
        which is persona_lens layer ``il + 1``."""
        import gguf

        path = Path(path)
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", self.model_id or "unknown")
        writer.add_uint32("controlvector.layer_count", self.n_layers - 1)
        v = self.get(pooling)
        for il in range(1, self.n_layers):
            writer.add_tensor(f"direction.{il}", (scale * v[il + 1]).numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path


def load_vector(path: str | Path) -> PersonaVector:
    """Load a persona_lens vector folder (or its .safetensors file), or a public-release
    ``.pt`` file holding a raw ``[n_layers + 1, d_model]`` tensor (loaded as response_avg)."""
    path = Path(path)
    if path.suffix == ".pt":
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ValueError(f"{path} should hold one [n_layers + 1, d_model] tensor.")
        return PersonaVector({"response_avg": t}, {"source": str(path)})
    folder = path.parent if path.suffix == ".safetensors" else path
    st = folder / "vector.safetensors"
    if not st.exists():
        raise FileNotFoundError(
            f"no vector.safetensors in {folder}: pass a folder written by persona_lens.extract, "
            "its vector.safetensors, or a public-release .pt file."
        )
    from safetensors.torch import load_file

    meta_file = folder / "vector.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return PersonaVector(load_file(st), meta)
