"""Bugs a new user found (issue #20): each test failed before its fix."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from PIL import Image

from stylelora.errors import ConfigError
from stylelora.webui import GridRequest
from stylelora.webui.handlers import MAX_CELLS, parse_values
from test_webui_handlers import request, studio  # noqa: F401  (the module-scoped Studio fixture)


def test_grid_with_no_y_axis_finishes(studio):  # noqa: F811
    # was: TypeError "unsupported format string passed to NoneType.__format__" after rendering every cell
    res = studio.grid(GridRequest(request(), "ink", [0.0, 1.0], "none", None, []))
    assert len(res.cells) == 2
    assert "X/Y grid: X ink weight 0, 1; Y none" in Image.open(res.path).info["parameters"]


def test_grid_size_message_counts_every_value(studio):  # noqa: F811
    # 0:100:0.5 has (100 - 0) / 0.5 + 1 = 201 values; with 2 seeds that is 402 images (was reported as 130)
    assert len(parse_values("0:100:0.5")) == 201
    with pytest.raises(ConfigError, match=f"402 images; at most {MAX_CELLS}"):
        studio.grid(GridRequest(request(), "ink", parse_values("0:100:0.5"), "seed", None, [1, 2]))
