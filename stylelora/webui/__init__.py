"""The stylelora web UI: ``handlers`` (all actions, no Gradio), ``paths`` (what a browser may touch), ``app`` (layout).

``stylelora webui --base tiny --adapters ./loras`` starts it; from Python::

    from stylelora.webui import Studio, build_app, launch
    studio = Studio(load_base("tiny"), "./loras", train_roots=["./datasets"])
    launch(studio)  # http://127.0.0.1:7860
"""

from .handlers import GenerateRequest, GridRequest, Studio
from .training import PRESETS, TrainRequest


def build_app(studio):
    """The Gradio page for ``studio`` (imports Gradio only when called)."""
    from .app import build_app as _build

    return _build(studio)


def launch(studio, **kwargs):
    """Serve ``studio`` (see ``stylelora.webui.app.launch``)."""
    from .app import launch as _launch

    return _launch(studio, **kwargs)


__all__ = ["GenerateRequest", "GridRequest", "PRESETS", "Studio", "TrainRequest", "build_app", "launch"]
