"""Every refusal on load (and save) comes from a crafted file and names the file and the key."""
import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from stylelora.adapter import Adapter, LoraModule
from stylelora.errors import AdapterError
from stylelora.formats import describe, load_adapter, read_metadata, save_adapter

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="session")
def tiny(tiny_base):
    """The session's tiny base (tests/conftest.py builds it once, in a temp STYLELORA_HOME); only read here."""
    return tiny_base


def good(rank=2, alpha=1.0, name=Q, inp=32, out=32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"{name}.lora_down.weight": torch.randn(rank, inp, generator=g),
            f"{name}.lora_up.weight": torch.randn(out, rank, generator=g), f"{name}.alpha": torch.tensor(alpha)}


def write(tmp_path, tensors, name="bad.safetensors", metadata=None):
    f = tmp_path / name
    save_file(tensors, f, metadata=metadata)
    return f


def refused(f, *names, pipe=None, **kw) -> str:
    with pytest.raises(AdapterError) as e:
        load_adapter(f, pipe=pipe, **kw)
    msg = str(e.value)
    for name in (str(f), *names):
        assert name in msg, (name, msg)
    return msg


# ------------------------------------------------------------------------------------------ file structure
def test_header_length_is_capped_before_parsing(tmp_path):
    f = tmp_path / "huge.safetensors"
    f.write_bytes((200 * 1024 * 1024).to_bytes(8, "little") + b"{}" * 10)
    assert "exceeds" in refused(f)


def test_corrupt_header_json(tmp_path):
    f = tmp_path / "corrupt.safetensors"
    f.write_bytes((12).to_bytes(8, "little") + b"{not json!!}")
    assert "corrupt safetensors header" in refused(f)
    g = tmp_path / "list.safetensors"
    g.write_bytes((2).to_bytes(8, "little") + b"[]")
    assert "corrupt safetensors header" in refused(g)


def test_header_entry_pointing_past_the_end(tmp_path):
    header = json.dumps({Q + ".alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4000]}}).encode()
    f = tmp_path / "short.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    refused(f, Q + ".alpha")


def test_not_safetensors_and_truncated(tmp_path):
    f = tmp_path / "notes.safetensors"
    f.write_text("these are my notes, not an adapter\n")
    assert "not a safetensors file" in refused(f)
    tiny_file = tmp_path / "tiny.safetensors"
    tiny_file.write_bytes(b"\1\2")
    refused(tiny_file)
    whole = write(tmp_path, good()).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    refused(cut)
    zipped = tmp_path / "zipped.safetensors"
    torch.save(good(), zipped)
    assert ".pt" in refused(zipped)


def test_missing_file_and_folder_without_weights(tmp_path):
    refused(tmp_path / "nope.safetensors")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "other.safetensors").write_bytes(b"")
    assert "other.safetensors" in refused(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ tensors
def test_shapes_checked_against_the_base_model(tiny, tmp_path):
    f = write(tmp_path, good(inp=768))
    msg = refused(f, Q + ".lora_down.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  pipe=tiny.pipe)
    assert "[2, 768]" in msg and "[2, 32]" in msg


def test_down_up_rank_mismatch(tiny, tmp_path):
    t = good()
    t[Q + ".lora_up.weight"] = torch.randn(32, 3)
    assert "rank mismatch" in refused(write(tmp_path, t), Q + ".lora_down.weight", Q + ".lora_up.weight",
                                      pipe=tiny.pipe)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_alpha(tiny, tmp_path, alpha):
    assert "alpha must be a finite number > 0" in refused(write(tmp_path, good(alpha=alpha)), Q + ".alpha",
                                                          pipe=tiny.pipe)


@pytest.mark.parametrize("role", ["lora_down.weight", "lora_up.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_weights(tiny, tmp_path, role, value):
    t = good()
    t[f"{Q}.{role}"][0, 0] = value
    assert "NaN or inf" in refused(write(tmp_path, t), f"{Q}.{role}", pipe=tiny.pipe)


def test_bad_alpha_in_peft_metadata(tiny, tmp_path):
    t = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 32),
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 2)}
    f = write(tmp_path, t, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": -4})})
    refused(f, "lora_adapter_metadata", "attn1.to_q.lora_A.weight", pipe=tiny.pipe)
    g = write(tmp_path, t, "g.safetensors", metadata={"lora_adapter_metadata": "{oops"})
    refused(g, "lora_adapter_metadata", pipe=tiny.pipe)


def test_missing_up_weight(tiny, tmp_path):
    t = good()
    del t[Q + ".lora_up.weight"]
    assert "no matching up weight" in refused(write(tmp_path, t), Q, pipe=tiny.pipe)


# --------------------------------------------------------------------------------------- families & keys
def test_sdxl_file_on_sd1_base_by_keys(tiny, tmp_path):
    t = {**good(), **good(name="lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
         **good(name="lora_te2_text_model_encoder_layers_0_self_attn_q_proj")}
    msg = refused(write(tmp_path, t), "SDXL", "lora_te2_", pipe=tiny.pipe)  # a second text encoder: SDXL
    assert "SD1.x" in msg


@pytest.mark.parametrize("key,value,name", [("ss_base_model_version", "sdxl_base_v1-0", "SDXL"),
                                            ("modelspec.architecture", "stable-diffusion-v2-768-v/lora", "SD2.x"),
                                            ("stylelora.family", "sdxl", "SDXL")])
def test_other_family_by_metadata(tiny, tmp_path, key, value, name):
    msg = refused(write(tmp_path, good(), metadata={key: value}), name, key, pipe=tiny.pipe)
    assert "SD1.x" in msg


def test_unused_keys_error_or_warning(tiny, tmp_path, caplog):
    ghost = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    f = write(tmp_path, {**good(), **good(name=ghost), "something_else.weight": torch.zeros(2)})
    msg = refused(f, ghost + ".lora_down.weight", ghost + ".alpha", "something_else.weight", pipe=tiny.pipe)
    assert "--allow-unused-keys" in msg
    with caplog.at_level(logging.WARNING, logger="stylelora.formats.load"):
        a = load_adapter(f, pipe=tiny.pipe, allow_unused_keys=True)
    assert list(a.modules["unet"]) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert ghost in caplog.text and str(f) in caplog.text


@pytest.mark.parametrize("extra", [
    {Q + ".oft_blocks": torch.zeros(4, 8, 8)},
    {Q + ".a1.weight": torch.zeros(2, 32), Q + ".a2.weight": torch.zeros(32, 2)},
    {Q + ".lora_up.bias": torch.zeros(32)},
])
def test_unsupported_adapter_types_refused_as_a_whole(tiny, tmp_path, extra):
    f = write(tmp_path, {**good(), **extra})
    msg = refused(f, "not supported", next(iter(extra)), pipe=tiny.pipe)
    assert "OFT" in msg and "LoHa" in msg  # what is refused, and what is read
    info = describe(f, hashes=False)
    assert info["supported"] is False and info["unsupported_keys"] == sorted(extra)


@pytest.mark.parametrize("extra", [
    {Q + ".hada_w1_a": torch.zeros(2, 2), Q + ".hada_w1_b": torch.zeros(2, 2)},
    {Q + ".lokr_w1": torch.zeros(2, 2)},
])
def test_lycoris_keys_mixed_into_a_lora_module_are_refused(tiny, tmp_path, extra):
    """LyCORIS files load (tests/test_lycoris.py); half a LyCORIS module beside a LoRA pair is an error naming it."""
    refused(write(tmp_path, {**good(), **extra}), next(iter(sorted(extra))), pipe=tiny.pipe)


def test_family_unknown_without_base(tmp_path):
    refused(write(tmp_path, good()), "--base")  # 32-wide tiny shapes and no metadata: nothing to resolve against


def test_sd15_file_resolves_without_base(tmp_path):
    t = good(inp=320, out=320)
    t.update(good(name=Q.replace("attn1_to_q", "attn2_to_k"), inp=768, out=320))
    a = load_adapter(write(tmp_path, t, "sd15.safetensors"))
    assert a.family == "sd1" and len(a.modules["unet"]) == 2


# ------------------------------------------------------------------------------------------------ pickles
def test_tensor_pickle_loads_with_weights_only(tiny, tmp_path):
    f = tmp_path / "old.pt"
    torch.save(good(), f)
    a = load_adapter(f, pipe=tiny.pipe)
    assert a.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 1.0
    assert read_metadata(f) == {}


class Payload:
    """Unpickling this would create a folder: the test proves loading never runs it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (self.marker,)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_malicious_pickle_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"
    f = tmp_path / f"evil{suffix}"
    with open(f, "wb") as fh:
        pickle.dump({Q + ".alpha": Payload(str(marker))}, fh, protocol=2)
    msg = refused(f, "weights_only")
    assert "refused" in msg and not marker.exists()


# ---------------------------------------------------------------------------------------------------- save
def test_save_refuses_bad_modules(tiny, tmp_path):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    nan = Adapter({"unet": {path: LoraModule(torch.full((2, 32), float("nan")), torch.ones(32, 2), 1.0)}})
    with pytest.raises(AdapterError, match="NaN") as e:
        save_adapter(nan, tmp_path / "nan.safetensors")
    assert path in str(e.value) and "nan.safetensors" in str(e.value)
    wrong = Adapter({"unet": {path: LoraModule(torch.ones(2, 64), torch.ones(32, 2), 1.0)}})
    with pytest.raises(AdapterError, match=path):
        save_adapter(wrong, tmp_path / "wrong.safetensors", pipe=tiny.pipe)
    ghost = Adapter({"unet": {"nowhere.to_q": LoraModule(torch.ones(2, 32), torch.ones(32, 2), 1.0)}})
    with pytest.raises(AdapterError, match="nowhere.to_q"):
        save_adapter(ghost, tmp_path / "ghost.safetensors", pipe=tiny.pipe)
    with pytest.raises(AdapterError, match="zip"):
        save_adapter(wrong, tmp_path / "x.safetensors", format="zip")
    assert not any(tmp_path.iterdir())


def test_saved_file_survives_reload_untouched(tiny, tmp_path):
    f = write(tmp_path, good(), "keep.safetensors")
    before = load_file(f)
    load_adapter(f, pipe=tiny.pipe)
    after = load_file(f)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_entry_size_not_matching_its_shape_names_the_key(tmp_path):
    header = json.dumps({Q + ".alpha": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    f = tmp_path / "short-entry.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    assert "needs 8 bytes" in refused(f, Q + ".alpha")


def test_trailing_bytes_after_the_tensors(tmp_path):
    f = write(tmp_path, good())
    f.write_bytes(f.read_bytes() + b"\0" * 16)
    assert "do not exactly cover" in refused(f)


@pytest.mark.parametrize("pattern", ["(.*){14}!", "(a|a)*$", "x" * 600, "a.*b.*c.*d.*e.*f", "[a-z]+\\.to_q"])
def test_peft_pattern_keys_that_could_backtrack_are_refused_fast(tmp_path, pattern):
    """A crafted alpha_pattern/rank_pattern key is never run as a regular expression over module names (ReDoS)."""
    import json
    import time

    from safetensors.torch import save_file

    from stylelora.formats import load_adapter

    path = tmp_path / "evil.safetensors"
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {pattern: 1}}),
            "ss_base_model_version": "sd_v1", "ss_sd_model_name": "tiny-random"}
    save_file(tensors, str(path), metadata=meta)
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=r"evil\.safetensors.*alpha_pattern key .*not a module name pattern"):
        load_adapter(path)
    assert time.perf_counter() - start < 5  # the crafted "(.*){14}!" alone ran for hours before


def test_peft_plain_and_wildcard_pattern_keys_still_apply():
    from stylelora.formats.peft import alpha_from_config

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    cfg = {"lora_alpha": 4, "alpha_pattern": {"^down_blocks.0.*to_q$": 1.0}}
    assert alpha_from_config("f", cfg, [name], 2) == 1.0
    assert alpha_from_config("f", {"lora_alpha": 4, "alpha_pattern": {"attn1.to_q": 3.0}}, [name], 2) == 3.0
    assert alpha_from_config("f", {"lora_alpha": 4, "alpha_pattern": {"attn2.to_q": 3.0}}, [name], 2) == 4.0
    escaped = {"lora_alpha": 4, "alpha_pattern": {r"^down_blocks\.0\.attentions.*to_q$": 2.5}}  # as PEFT users write
    assert alpha_from_config("f", escaped, [name], 2) == 2.5


def test_a_zip_bomb_pickle_is_refused_from_its_directory_before_torch_load(tmp_path, monkeypatch):
    """A .pt whose zip members declare far more bytes than the file (torch.save never compresses) is refused
    before torch.load inflates it in memory."""
    import zipfile

    bomb = tmp_path / "zipbomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MiB of zeros: a ~64 KB file
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not run on a bomb"))
    with pytest.raises(AdapterError, match=r"zipbomb\.pt: .*declares 67,108,864 bytes unpacked.*decompression bomb"):
        load_adapter(bomb)
    # a real torch.save file (uncompressed members) still passes the check
    from stylelora.tensorfile import check_torch_archive

    ok = tmp_path / "ok.pt"
    monkeypatch.undo()
    torch.save({"x": torch.zeros(1000)}, ok)
    check_torch_archive(ok)
