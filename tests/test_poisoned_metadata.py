"""Others' metadata is untrusted: valid JSON of another shape, huge or infinite numbers, JSON nested past Python's
recursion limit. `inspect` (text and --json) and the web UI's library listing show such a file, never crash on it,
and --json never prints NaN (issue 22)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from stylelora.cli import main

KEYS = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2)}
DEEP = "[" * 100_000 + "]" * 100_000
POISON = {
    "config_of_another_shape": {"stylelora.config": json.dumps({"data": []})},
    "trigger_not_a_string": {"stylelora.config": json.dumps({"data": {"trigger": {"a": 1}}})},
    "start_time_1e20": {"ss_training_started_at": "1e20", "ss_training_finished_at": "2e20"},
    "start_time_inf": {"ss_training_started_at": "inf"},
    "tag_count_infinite": {"ss_tag_frequency": '{"a": {"b": Infinity}}'},
    "tags_nested_deep": {"ss_tag_frequency": DEEP},
    "config_nested_deep": {"stylelora.config": DEEP},
    "merged_from_nested_deep": {"modelspec.merged_from": DEEP},
    "numbers_nan": {"ss_network_dim": "nan", "ss_network_alpha": "inf", "ss_learning_rate": "NaN",
                    "stylelora.config": '{"optim": {"lr": NaN}}'},
}


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("poisoned")
    for name, md in POISON.items():
        save_file(KEYS, str(folder / f"{name}.safetensors"),
                  metadata={"ss_base_model_version": "sd_v1", "ss_sd_model_name": "tiny-random", **md})
    return folder


@pytest.mark.parametrize("name", sorted(POISON))
def test_inspect_shows_the_file_and_json_stays_standard(poisoned, name, capsys):
    path = poisoned / f"{name}.safetensors"
    assert main(["inspect", str(path)]) == 0
    assert main(["inspect", "--json", str(path)]) == 0
    text = capsys.readouterr().out.split("\n{", 1)[1]
    info = json.loads("{" + text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert info["family"] == "sd1" and info["num_modules"] == 1
    if name == "trigger_not_a_string":
        assert info["trigger"] is None


def test_library_lists_every_poisoned_file(poisoned, tmp_path):
    from stylelora.webui.library import Library

    lib = Library(poisoned, tmp_path)
    assert sorted(lib.names()) == sorted(POISON)
    for name in lib.names():
        info = lib.info(name)
        row = info.row()
        assert row[0] == name and all(isinstance(c, (str, int, float)) for c in row), row
        info.summary()
        lib.details(name)
