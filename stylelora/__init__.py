"""stylelora: train LoRA style adapters for Stable Diffusion, save them in the formats every tool loads, blend them."""

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule, TokenEmbedding  # noqa: E402
from .config import DataConfig, NetworkConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from .errors import StyleloraError  # noqa: E402
from .blend import Blender  # noqa: E402



def train(config: TrainConfig, **kwargs):
    """Train an adapter (see ``stylelora.training.train``); returns the path of the written ``.safetensors`` file."""
    from .training import train as _train  # the loop lives in stylelora.training; imported late (torch/peft are heavy)

    return _train(config, **kwargs)


__all__ = ["Adapter", "LoraModule", "TokenEmbedding", "TrainConfig", "DataConfig", "NetworkConfig", "OptimConfig", "RunConfig",
           "StyleloraError", "train", "__version__", "Blender"]
