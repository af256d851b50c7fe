"""Learnt trigger tokens at generation time: in the tokenizer(s) while the adapter is blended, out exactly after;
our images == diffusers' load_lora_weights + load_textual_inversion of the written files; bake keeps them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread

from stylelora.adapter import Adapter, LoraModule, TokenEmbedding
from stylelora.bake import BAKE_INFO, bake
from stylelora.blend import Blender
from stylelora.errors import AdapterError, ConfigError
from stylelora.formats import save_adapter
from stylelora.generate import Settings, generate, parse_infotext
from stylelora.models import load_base
from stylelora.prompt import parse_spec

WORD = "zzstyle"
PROMPT = f"{WORD}, a red circle"
SIZE = {"tiny-random": 32, "tiny-sdxl": 64}
FAMILY = {"tiny-random": "sd1", "tiny-sdxl": "sdxl"}
# with an output projection: diffusers tells its old text-encoder LoRA layout by a to_out key
TARGETS = ("to_q", "to_v", "to_out.0", "q_proj", "v_proj", "out_proj")
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def quiet_base(spec):
    base = load_base(spec)
    base.pipe.set_progress_bar_config(disable=True)
    return base


def make_adapter(pipe, spec, name="ink", word=WORD, num_tokens=2, seed=0) -> Adapter:
    """Random rank-2 LoRA on attention q/v/out of every component (alpha = rank: scale 1 under any alpha convention)
    plus ``num_tokens`` learnt vectors per text encoder, sized like the base's token rows."""
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=name, family=FAMILY[spec])
    for comp in ("unet", *TEXT_ENCODERS):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        adapter.modules[comp] = {
            path: LoraModule(down=torch.randn(2, m.in_features, generator=g) * 0.3,
                             up=torch.randn(m.out_features, 2, generator=g) * 0.3, alpha=2.0)
            for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and path.endswith(tuple("." + t for t in TARGETS))}
    vectors = {}
    for comp in TEXT_ENCODERS:
        model = getattr(pipe, comp, None)
        if model is not None:
            table = model.get_input_embeddings().weight
            vectors[comp] = torch.randn(num_tokens, table.shape[1], generator=g) * 3 * table.std()
    adapter.embeddings[word] = TokenEmbedding(word, vectors)
    return adapter


def render(pipe, spec, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=2, height=SIZE[spec], width=SIZE[spec], guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]


def text_state(pipe) -> dict:
    """Everything trigger tokens touch: the embedding module itself, its rows, the config, the tokenizer."""
    out = {}
    for comp, tok_name in TEXT_ENCODERS.items():
        te, tok = getattr(pipe, comp, None), getattr(pipe, tok_name, None)
        if te is not None:
            table = te.get_input_embeddings()
            out[comp] = (table, table.weight.detach().clone(), te.config.vocab_size, len(tok), tok.get_vocab())
    return out


def assert_same_text_state(before, after):
    assert before.keys() == after.keys()
    for comp in before:
        (mod0, w0, v0, n0, vocab0), (mod1, w1, v1, n1, vocab1) = before[comp], after[comp]
        assert mod1 is mod0, comp
        assert torch.equal(w1, w0), comp  # bit for bit
        assert (v1, n1) == (v0, n0) and vocab1 == vocab0, comp


@pytest.mark.parametrize("spec", ["tiny-random", "tiny-sdxl"])
def test_tokens_follow_the_blend_and_leave_exactly(spec):
    base = quiet_base(spec)
    pipe = base.pipe
    adapter = make_adapter(pipe, spec)
    before, plain = text_state(pipe), render(pipe, spec)
    blender = Blender(base)
    blender.load(adapter)
    assert_same_text_state(before, text_state(pipe))  # weight 0: not part of the blend, no tokens
    blender.set({"ink": 1.0})
    assert blender.trigger_words() == {WORD: "ink"}
    for comp, tok_name in TEXT_ENCODERS.items():
        if getattr(pipe, comp, None) is None:
            continue
        tok, table = getattr(pipe, tok_name), getattr(pipe, comp).get_input_embeddings().weight
        assert len(tok) == before[comp][3] + 2
        ids = tok.convert_tokens_to_ids([WORD, f"{WORD}_1"])
        assert torch.equal(table[ids].detach(), adapter.embeddings[WORD].vectors[comp])
        # diffusers' pipelines expand the word to all its tokens (TextualInversionLoaderMixin.maybe_convert_prompt)
        assert pipe.maybe_convert_prompt(PROMPT, tok) == f"{WORD} {WORD}_1, a red circle"
    blender.set({"ink": 0.0})
    assert_same_text_state(before, text_state(pipe))
    assert np.array_equal(render(pipe, spec), plain)
    blender.set({"ink": (0.0, 0.5)})  # a text-encoder-only weight is in the blend too
    assert blender.trigger_words() == {WORD: "ink"}
    blender.unload("ink")
    assert_same_text_state(before, text_state(pipe))
    assert np.array_equal(render(pipe, spec), plain)


def test_second_adapter_keeps_its_rows_when_the_first_leaves():
    base = quiet_base("tiny-random")
    pipe = base.pipe
    before = text_state(pipe)
    a = make_adapter(pipe, "tiny-random", "a", "aaword", num_tokens=3, seed=1)
    b = make_adapter(pipe, "tiny-random", "b", "bbword", num_tokens=2, seed=2)
    blender = Blender(base)
    blender.set({blender.load(a): 1.0, blender.load(b): 0.5})
    blender.update({"a": 0.0})
    tok, table = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight
    assert "aaword" not in tok.get_vocab() and len(tok) == before["text_encoder"][3] + 2
    assert torch.equal(table[tok.convert_tokens_to_ids(["bbword", "bbword_1"])].detach(),
                       b.embeddings["bbword"].vectors["text_encoder"])
    assert table.shape[0] == len(tok) == pipe.text_encoder.config.vocab_size
    blender.reset()
    assert_same_text_state(before, text_state(pipe))


def test_same_word_in_two_adapters_names_both(tmp_path):
    base = load_base("tiny-random")
    first = save_adapter(make_adapter(base.pipe, "tiny-random", "first", seed=1), tmp_path / "first.safetensors")
    second = save_adapter(make_adapter(base.pipe, "tiny-random", "second", seed=2), tmp_path / "second.safetensors")
    blender = Blender(base)
    blender.load(first)
    with pytest.raises(AdapterError) as err:
        blender.load(second)
    message = str(err.value)
    assert "first" in message and "second" in message and WORD in message and str(second) in message
    assert blender.names == ["first"]


def test_bad_embeddings_are_refused_before_anything_changes():
    base = load_base("tiny-random")
    pipe = base.pipe
    before = text_state(pipe)
    blender = Blender(base)

    def with_vectors(vec, word=WORD):
        adapter = make_adapter(pipe, "tiny-random", "bad")
        adapter.embeddings = {word: TokenEmbedding(word, {"text_encoder": vec})}
        return adapter

    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    with pytest.raises(AdapterError, match=rf"'bad'.*{WORD}.*\(2, {width + 1}\)"):
        blender.load(with_vectors(torch.zeros(2, width + 1)))
    with pytest.raises(AdapterError, match="NaN"):
        blender.load(with_vectors(torch.full((1, width), float("nan"))))
    sdxl_like = with_vectors(torch.zeros(1, width))
    sdxl_like.embeddings[WORD].vectors["text_encoder_2"] = torch.zeros(1, width)
    with pytest.raises(AdapterError, match="text_encoder_2"):
        blender.load(sdxl_like)
    known = next(t for t in pipe.tokenizer.get_vocab() if t.isalpha())  # a word the tokenizer already has
    with pytest.raises(AdapterError, match="already has a token"):
        blender.load(with_vectors(torch.zeros(1, width), word=known))
    assert blender.names == []
    assert_same_text_state(before, text_state(pipe))


def _theirs_sd1(path, sidecar=None):
    """diffusers alone: LoRA weights from our kohya file (without the bundle_emb.* keys, which its kohya converter
    does not take) and the sidecar embedding with load_textual_inversion."""
    from safetensors.torch import load_file

    pipe = quiet_base("tiny-random").pipe
    pipe.load_lora_weights({k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")})
    if sidecar is not None:
        pipe.load_textual_inversion(str(sidecar), token=WORD)
    return pipe


def test_generate_with_prompt_tag_matches_diffusers_sd1(tmp_path):
    """SD1: the kohya file named by a <lora:...> tag in the prompt, through generate(), vs diffusers."""
    base = quiet_base("tiny-random")
    path = save_adapter(make_adapter(base.pipe, "tiny-random"), tmp_path / "ink.safetensors", pipe=base.pipe)
    sidecar = tmp_path / "ink_emb.safetensors"
    assert sidecar.is_file()
    settings = Settings(prompt=f"{PROMPT} <lora:ink:1>", seed=3, steps=2, guidance=5.0, width=32, height=32)
    ours = generate(base, settings, folders=[tmp_path])[0]
    call = dict(num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                generator=torch.Generator("cpu").manual_seed(3))
    theirs = _theirs_sd1(path, sidecar)(PROMPT, **call).images[0]
    diff = np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32)).max()
    assert diff <= 2.5
    call["generator"] = torch.Generator("cpu").manual_seed(3)
    without_tokens = _theirs_sd1(path)(PROMPT, **call).images[0]
    assert np.abs(np.asarray(ours, np.float32) - np.asarray(without_tokens, np.float32)).max() > 10  # tokens matter
    info = parse_infotext(ours.info["parameters"])
    assert "<lora:ink:1>" in info["Prompt"] and WORD in info["Prompt"]


def test_blend_matches_diffusers_sdxl(tmp_path):
    """SDXL: our Blender on the PEFT file (diffusers reads it as is) vs diffusers with the clip_l/clip_g sidecar."""
    from safetensors.torch import load_file

    base = quiet_base("tiny-sdxl")
    path = save_adapter(make_adapter(base.pipe, "tiny-sdxl"), tmp_path / "ink.safetensors", format="peft",
                        pipe=base.pipe)
    blender = Blender(base)
    blender.set({blender.load(path): 1.0})
    ours = render(base.pipe, "tiny-sdxl")
    theirs = quiet_base("tiny-sdxl").pipe
    theirs.load_lora_weights(str(path))
    lora_only = render(theirs, "tiny-sdxl")
    side = load_file(str(tmp_path / "ink_emb.safetensors"))
    theirs.load_textual_inversion(side["clip_l"], token=WORD, text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(side["clip_g"], token=WORD, text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    assert np.abs(ours - render(theirs, "tiny-sdxl")).max() <= 2.5 / 255
    assert np.abs(ours - lora_only).max() > 10 / 255  # the tokens matter


def test_bake_folder_carries_tokens_and_single_file_refuses(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = quiet_base("tiny-random")
    path = save_adapter(make_adapter(base.pipe, "tiny-random"), tmp_path / "ink.safetensors", pipe=base.pipe)
    blender = Blender(base)
    blender.set({blender.load(path): 0.8})
    blended = render(base.pipe, "tiny-random")

    out = bake(quiet_base("tiny-random"), [parse_spec(f"{path}:0.8")], tmp_path / "baked")
    baked = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    baked.set_progress_bar_config(disable=True)
    assert f"{WORD}_1" in baked.tokenizer.get_vocab()
    assert np.abs(render(baked, "tiny-random") - blended).max() < 1e-5
    info = json.loads((out / BAKE_INFO).read_text())
    assert info["trigger_tokens"] == {WORD: {"adapter": "ink", "tokens": [WORD, f"{WORD}_1"]}}

    with pytest.raises(ConfigError, match="(?s)single-file.*folder.*_emb.safetensors"):
        bake(quiet_base("tiny-random"), [parse_spec(f"{path}:0.8")], tmp_path / "baked.safetensors",
             single_file=True)
    assert not (tmp_path / "baked.safetensors").exists()


def test_web_ui_switches_between_adapters_that_share_a_word(tmp_path):
    """The web UI unloads an unpicked adapter with trigger words, so another with the same word can be picked; the
    tokens leave with it (a plain generation is bit for bit the first one)."""
    from PIL import Image

    from stylelora.webui import GenerateRequest, Studio

    base = load_base("tiny-random")
    lib = tmp_path / "loras"
    lib.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        save_adapter(make_adapter(base.pipe, "tiny-random", name, seed=seed), lib / f"{name}.safetensors",
                     pipe=base.pipe)
    studio = Studio(base, lib, work_dir=tmp_path / "work")
    try:
        def run(prompt=PROMPT, **kw):
            res = studio.generate(GenerateRequest(prompt=prompt, steps=2, seed=3, width=64, height=64, **kw))
            return np.asarray(Image.open(res.paths[0]).convert("RGB"), np.int16)

        plain, with_a = run(), run(adapters={"a": 1.0})
        with_b = run(f"{PROMPT} <lora:b:1>")  # b by its prompt tag; a is no longer picked
        assert studio.blender.trigger_words() == {WORD: "b"}
        assert np.abs(with_b - with_a).max() > 0
        assert np.array_equal(run(adapters={"a": 1.0}), with_a)
        assert np.array_equal(run(), plain)
    finally:
        studio.close()


def test_sidecars_are_not_listed_as_adapters_and_travel_with_library_copies(tmp_path):
    from stylelora.prompt import available_adapters
    from stylelora.webui.library import Library

    base = quiet_base("tiny-random")
    src = tmp_path / "run" / "ink.safetensors"
    src.parent.mkdir()
    save_adapter(make_adapter(base.pipe, "tiny-random"), src, pipe=base.pipe)
    assert (tmp_path / "run" / "ink_emb.safetensors").is_file()  # written for ComfyUI / diffusers
    assert sorted(available_adapters([src.parent])) == ["ink"]  # the sidecar is no adapter

    (tmp_path / "loras").mkdir()
    lib = Library(tmp_path / "loras", tmp_path / "thumbs")
    name = lib.keep_trained(src, "mine")
    assert name == "mine" and lib.names() == ["mine"]
    sidecar = lib.root / "mine_emb.safetensors"
    assert sidecar.is_file()  # named after the library copy, not the run's file
    from stylelora.formats import load_embedding

    got = load_embedding(sidecar, name=WORD)
    want = make_adapter(base.pipe, "tiny-random").embeddings[WORD]
    assert torch.equal(got.vectors["text_encoder"], want.vectors["text_encoder"])
    (lib.root / "other_emb.safetensors").write_bytes(sidecar.read_bytes())  # someone else's embedding: not ours
    lib.delete("mine")
    assert not sidecar.exists() and (lib.root / "other_emb.safetensors").exists()
    assert lib.names() == []
