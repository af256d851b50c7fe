"""stylelora: train LoRA style adapters for Stable Diffusion, save them in the formats every tool loads, blend them."""

__version__ = "0.1.0"

from .config import DataConfig, NetworkConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from .errors import StyleloraError  # noqa: E402

# torch-backed names are imported on first use: `import stylelora` (and so `stylelora --help` and argument errors)
# must not pay the seconds torch/diffusers take to import.
_LAZY = {"Adapter": "adapter", "LoraModule": "adapter", "TokenEmbedding": "adapter", "Blender": "blend"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



def train(config: TrainConfig, **kwargs):
    """Train an adapter (see ``stylelora.training.train``); returns the path of the written ``.safetensors`` file."""
    from .training import train as _train  # the loop lives in stylelora.training; imported late (torch/peft are heavy)

    return _train(config, **kwargs)


__all__ = ["Adapter", "LoraModule", "TokenEmbedding", "TrainConfig", "DataConfig", "NetworkConfig", "OptimConfig", "RunConfig",
           "StyleloraError", "train", "__version__", "Blender"]
