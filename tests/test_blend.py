"""Blender: fused blend == PEFT's unfused set_adapters, exact restore, minimal re-application, refusals, file cache."""

from __future__ import annotations

import pytest
import torch

from stylelora import __version__, lora
from stylelora.adapter import Adapter, LoraModule
from stylelora.blend import Blender, compatible
from stylelora.errors import AdapterError
from stylelora.models import load_base

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SIZE, STEPS = 32, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model ops gain nothing from threads, and on a busy shared CPU a descheduled OpenMP thread stalls every
    op at its barrier (runs got 5-10x slower); one thread keeps these tests fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_adapter(pipe, name: str, rank: int, seed: int, *, unet=UNET_TARGETS, te=TE_TARGETS, alpha=None,
                   std: float = 0.3) -> Adapter:
    """Random down/up for the tiny pipe's attention layers (large enough to change images visibly)."""
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=name, family="sd1",
                      metadata={"ss_sd_model_name": "tiny-random", "stylelora.version": __version__})
    for comp, module, targets in (("unet", pipe.unet, unet), ("text_encoder", pipe.text_encoder, te)):
        mods = {}
        for path, m in module.named_modules():
            if isinstance(m, torch.nn.Linear) and any(path.endswith("." + t) for t in targets or ()):
                mods[path] = LoraModule(down=torch.randn(rank, m.in_features, generator=g) * std,
                                        up=torch.randn(m.out_features, rank, generator=g) * std,
                                        alpha=float(alpha if alpha is not None else rank / 2))
        if mods:
            adapter.modules[comp] = mods
    return adapter


def three_adapters(pipe) -> list[Adapter]:
    """Different ranks and target sets: full (r4), q/v-only (r2), text-encoder-only (r3)."""
    return [random_adapter(pipe, "ink", 4, 1),
            random_adapter(pipe, "pastel", 2, 2, unet=("to_q", "to_v"), te=("q_proj",), alpha=1.0),
            random_adapter(pipe, "tonly", 3, 3, unet=None)]


def render(pipe, prompt: str = "a lighthouse at dusk"):
    return pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=7.0,
                generator=torch.Generator().manual_seed(7), output_type="np").images


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def blended():
    """A tiny pipe with a Blender holding the three adapters, plus the pristine state and base image."""
    base = load_base("tiny-random")
    quiet(base.pipe)
    adapters = three_adapters(base.pipe)
    state = snapshot(base.pipe)
    image = render(base.pipe)
    blender = Blender(base)
    for a in adapters:
        blender.load(a)
    return blender, adapters, state, image


@pytest.fixture(scope="module")
def reference(blended):
    """A second tiny pipe with the same adapters attached unfused as PEFT layers."""
    pipe = quiet(load_base("tiny-random").pipe)
    for a in blended[1]:
        lora.attach(pipe, a, a.name)
    return pipe


def set_peft_weights(pipe, adapters, weights: dict[str, tuple[float, float]]) -> None:
    """Unfused reference: per-component set_adapters (an adapter absent from a component is skipped there)."""
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    unet = [a.name for a in adapters if a.name in weights and "unet" in a.modules]
    te = [a.name for a in adapters if a.name in weights and "text_encoder" in a.modules]
    pipe.unet.set_adapters(unet, [weights[n][0] for n in unet])
    set_adapters_for_text_encoder(te, pipe.text_encoder, [weights[n][1] for n in te])


CASES = {
    "one": {"ink": (0.8, 0.8)},
    "two": {"ink": (0.6, 0.5), "pastel": (0.4, -0.7)},
    "three": {"ink": (-0.5, 0.3), "pastel": (0.9, 0.2), "tonly": (0.0, 0.8)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_unfused_peft(blended, reference, case):
    blender, adapters, _, base_image = blended
    weights = CASES[case]
    blender.set(weights)
    set_peft_weights(reference, adapters, weights)
    fused, unfused = render(blender.pipe), render(reference)
    assert abs(fused - base_image).max() > 1e-2, "the blend should change the image"
    assert abs(fused - unfused).max() < 1e-4
    # the fused path adds no layers: a denoising step costs what the base step costs
    assert not any("lora" in n for n, _ in blender.pipe.unet.named_modules())


def test_fused_weight_is_exact_formula(blended):
    blender, adapters, state, _ = blended
    blender.set({"ink": (0.7, 0.1), "pastel": (-0.3, 0.5)})
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ink, pastel = (a.modules["unet"][path] for a in adapters[:2])
    expected = state[f"unet.{path}.weight"] + 0.7 * ink.delta() - 0.3 * pastel.delta()
    assert torch.allclose(blender.pipe.unet.get_submodule(path).weight, expected, atol=1e-6)
    te_path = "encoder.layers.1.self_attn.k_proj"  # only ink targets k_proj in the text encoder
    te_expected = state[f"text_encoder.{te_path}.weight"] + 0.1 * adapters[0].modules["text_encoder"][te_path].delta()
    assert torch.allclose(blender.pipe.text_encoder.get_submodule(te_path).weight, te_expected, atol=1e-6)


def test_all_zero_restores_base_bitwise(blended):
    blender, _, state, base_image = blended
    for weights in ({"ink": 0.8}, {"ink": -1.3, "pastel": (0.4, 0.2)}, {"tonly": 2.5, "pastel": 0.1},
                    {"ink": 1e-3, "pastel": (-2.0, 0.0), "tonly": (0.0, -0.9)}):
        blender.set(weights)
    blender.update({"ink": 0.0})
    blender.reset()
    after = snapshot(blender.pipe)
    assert after.keys() == state.keys()
    changed = [k for k in state if not torch.equal(after[k], state[k])]
    assert not changed, changed[:5]
    assert (render(blender.pipe) == base_image).all()


def test_only_affected_layers_are_rewritten(blended):
    blender, adapters, _, _ = blended
    blender.reset()
    n_te = len(adapters[2].modules["text_encoder"])
    assert blender.set({"tonly": 0.5}) == n_te  # a text-encoder-only adapter touches no UNet layer
    assert blender.set({"tonly": 0.5}) == 0  # same weights: nothing to do
    n_pastel_unet = len(adapters[1].modules["unet"])
    assert blender.update({"pastel": (0.3, 0.0)}) == n_pastel_unet  # TE weight 0: only its UNet layers
    assert blender.weights["tonly"] == (0.5, 0.5) and blender.active().keys() == {"tonly", "pastel"}
    blender.reset()


def test_unload_and_reload(blended):
    blender, adapters, state, _ = blended
    blender.set({"ink": 1.0, "tonly": 1.0})
    blender.unload("ink")
    assert "ink" not in blender.names
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(blender.pipe.unet.get_submodule(path).weight, state[f"unet.{path}.weight"])
    assert blender.load(adapters[0]) == "ink" and blender.weights["ink"] == (0.0, 0.0)
    assert blender.load(adapters[0], weight=0.2) == "ink" and blender.weights["ink"] == (0.2, 0.2)
    blender.reset()


def test_unknown_name_and_bad_weight(blended):
    blender = blended[0]
    with pytest.raises(AdapterError, match="not loaded; loaded: .*ink"):
        blender.set({"nope": 1.0})
    with pytest.raises(AdapterError, match="finite"):
        blender.set({"ink": float("nan")})
    with pytest.raises(AdapterError, match="expected a number"):
        blender.set({"ink": (1, 2, 3)})


def test_same_name_different_content_refused(blended):
    blender, _, _, _ = blended
    other = random_adapter(blender.pipe, "ink", 2, 99)
    with pytest.raises(AdapterError, match="already loaded"):
        blender.load(other)
    assert blender.load(other, name="ink-2") == "ink-2"
    blender.unload("ink-2")


def test_family_mismatch_refused(tiny_base):
    blender = Blender(tiny_base)
    adapter = random_adapter(tiny_base.pipe, "xl", 2, 5)
    adapter.family = "sdxl"
    with pytest.raises(AdapterError, match="made for sdxl but the base model is sd1"):
        blender.load(adapter)
    assert compatible("sd2-v", "sd2") and compatible("sd2", "sd2-v") and not compatible("sd1", "sd2")
    assert compatible(None, "sd1")


def test_wrong_module_or_shape_refused(tiny_base):
    blender = Blender(tiny_base)
    bad = random_adapter(tiny_base.pipe, "bad", 2, 6)
    path = next(iter(bad.modules["unet"]))
    bad.modules["unet"][path] = LoraModule(torch.zeros(2, 7), torch.zeros(5, 2), 2.0)
    with pytest.raises(AdapterError, match=f"unet.{path}.*does not fit"):
        blender.load(bad)
    ghost = Adapter(name="ghost", family="sd1",
                    modules={"unet": {"down_blocks.9.attn.to_q": LoraModule(torch.zeros(2, 4), torch.zeros(4, 2), 2)}})
    with pytest.raises(AdapterError, match="no module unet.down_blocks.9.attn.to_q"):
        blender.load(ghost)
    assert not blender.names  # nothing half-loaded


def test_file_loaded_once_per_content(tiny_base, tmp_path, monkeypatch):
    from stylelora import formats
    from stylelora.formats import save_adapter

    adapter = random_adapter(tiny_base.pipe, "filed", 2, 11)
    first = save_adapter(adapter, tmp_path / "filed.safetensors", pipe=tiny_base.pipe)
    copy = tmp_path / "sub" / "filed.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    calls = []
    real = formats.load_adapter
    monkeypatch.setattr(formats, "load_adapter", lambda *a, **k: calls.append(a) or real(*a, **k))
    b1, b2 = Blender(tiny_base), Blender(tiny_base)
    assert b1.load(first) == "filed"
    assert b1.load(first) == "filed"
    assert b2.load(copy) == "filed"  # same bytes elsewhere: served from the cache
    assert len(calls) == 1
    loaded = b1.loaded["filed"]
    assert loaded.model_hash == loaded.adapter.metadata["sshs_model_hash"] and len(loaded.model_hash) == 64
    for name, m in adapter.modules["unet"].items():
        assert torch.equal(loaded.adapter.modules["unet"][name].down, m.down)
