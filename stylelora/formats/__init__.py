"""Adapter files: read any common LoRA layout into an ``Adapter``, write kohya (default) or PEFT layout.

- ``arch``: module tables (live model or a real architecture on the meta device) and every name a module has
- ``keys``: recognising key layouts and the model family a file is for
- ``io``: checked safetensors headers, safe pickles, atomic writes, kohya's ``sshs_*`` hashes
- ``kohya`` / ``peft``: the two layouts we write; ``embeddings``: learnt token embeddings in both, and sidecar files
- ``lyco``: LyCORIS (LoHa, LoKr, LoCon-Tucker), full/norm-difference and DoRA modules (docs/formats.md)
- ``load`` / ``save``: the public entry points; ``validate``: the checks they share
- ``metadata``: what a trained adapter records; ``summary``: what ``stylelora inspect`` reports
"""

from .embeddings import is_embedding_file, load_embedding, sidecar_paths
from .io import model_hashes, read_metadata
from .load import load_adapter
from .metadata import training_metadata
from .save import FORMATS, save_adapter
from .summary import describe

__all__ = ["FORMATS", "describe", "is_embedding_file", "load_adapter", "load_embedding", "model_hashes", "read_metadata", "save_adapter",
           "sidecar_paths", "training_metadata"]
