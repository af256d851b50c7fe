"""stylelora: train LoRA style adapters for Stable Diffusion, save them in the formats every tool loads, blend them."""

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule  # noqa: E402
from .config import DataConfig, NetworkConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from .errors import StyleloraError  # noqa: E402


def train(config: TrainConfig):
    """Train an adapter; returns the path of the written ``.safetensors`` file."""
    from .train import train as _train

    return _train(config)


__all__ = ["Adapter", "LoraModule", "TrainConfig", "DataConfig", "NetworkConfig", "OptimConfig", "RunConfig",
           "StyleloraError", "train", "__version__"]
