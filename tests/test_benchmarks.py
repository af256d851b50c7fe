"""The benchmark scripts run end to end at toy sizes (their real runs are not tests; this keeps them from rotting)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_style_quality_runs_and_writes_its_table(tmp_path, capsys):
    sq = _script("style_quality")
    out = tmp_path / "sq"
    results = sq.main(["--styles", "stripes,pastel", "--n", "2", "--train-steps", "2", "--steps", "2",
                       "--out", str(out), "--threads", "1", "--decompose"])
    assert set(results["styles"]) == {"stripes", "pastel"} and set(results["blends"]) == {"stripes+pastel"}
    assert 0.0 <= results["blends"]["stripes+pastel"]["base_words"] <= 1.0
    assert results["blends"]["stripes+pastel"]["ceiling"] == 1.0  # both looks survive the VAE round trip
    assert {k: set(v) for k, v in results["decompose"].items()} == {"stripes": {"alone", "with pastel word"},
                                                                   "pastel": {"alone", "with stripes word"}}
    assert all(0.0 <= x <= 1.0 for v in results["decompose"].values() for x in v.values())
    for m in results["styles"].values():
        for key in ("fidelity", "content", "leakage", "base_fp", "base_word", "ceiling"):
            assert 0.0 <= m[key] <= 1.0, (key, m)
    # the VAE round trip of the committed base keeps these styles for the classifier (it does not generate)
    assert all(m["ceiling"] == 1.0 for m in results["styles"].values()), results["styles"]
    assert json.loads((out / "results.json").read_text())["styles"].keys() == results["styles"].keys()
    assert (out / results["adapters"]["stripes"]).exists() and (out / "blend-stripes+pastel.png").exists()
    table = capsys.readouterr().out
    assert "fidelity" in table and "ceiling" in table and "goals:" in table


def test_style_quality_scores_a_user_recipe_and_resized_adapters(tmp_path, monkeypatch):
    import stylelora

    sq = _script("style_quality")
    real_train, trained = stylelora.train, []
    monkeypatch.setattr(stylelora, "train", lambda cfg: trained.append(cfg) or real_train(cfg))
    results = sq.main(["--styles", "stripes", "--n", "2", "--train-steps", "2", "--steps", "2", "--recipe", "quick",
                       "--resize", "rank=2", "--out", str(tmp_path), "--threads", "1"])
    cfg = trained[0]  # the web UI's quick preset as scaled for tiny: its built-in plain pictures, no token_init
    assert (cfg.network.rank, cfg.data.reg_folder, cfg.network.token_init, cfg.run.base) == (4, "toy:plain", None,
                                                                                             "tiny")
    m = results["styles"]["stripes"]
    name = results["adapters"]["stripes"]
    assert name.endswith("-resize-rank2.safetensors") and (tmp_path / name).exists()
    assert m["size"] == (tmp_path / name).stat().st_size < m["trained_size"]
    from stylelora.formats import load_adapter

    assert load_adapter(tmp_path / name).ranks() == {c: {2} for c in ("unet", "text_encoder")}


def test_style_quality_reuses_an_adapter_only_for_the_same_recipe_and_base(tmp_path, monkeypatch):
    import stylelora

    sq = _script("style_quality")
    real_train, trained = stylelora.train, []
    monkeypatch.setattr(stylelora, "train", lambda cfg: trained.append(cfg) or real_train(cfg))
    first = sq.train_adapters(["stripes"], tmp_path, steps=2)["stripes"]
    again = sq.train_adapters(["stripes"], tmp_path, steps=2)["stripes"]
    assert len(trained) == 1 and again == first and first.exists()  # same recipe: reused, not retrained
    changed = sq.train_adapters(["stripes"], tmp_path, steps=2, lr=5e-4)["stripes"]
    assert len(trained) == 2 and changed != first and changed.exists() and first.exists()
    assert trained[1].optim.lr == 5e-4 and trained[1].run.output == str(changed)
    sq.train_adapters(["stripes"], tmp_path, no_reg=True, steps=2)  # no regularization pictures: another recipe
    assert len(trained) == 3
    # the key ignores where files go, and changes with the base or with any training field
    config = trained[0]
    key = sq.recipe_key(config)
    assert sq.recipe_key(config.replace(output=str(tmp_path / "elsewhere.safetensors"), cache_dir="c")) == key
    assert sq.recipe_key(config.replace(base="tiny-random")) != key
    assert sq.recipe_key(config.replace(log_every=7)) != key


def _run_json(script: str, *args: str) -> dict:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_train_throughput_measures_both_modes():
    r = _run_json("train_throughput", "--base", "tiny-random", "--batch-sizes", "2", "--warmup", "1", "--steps", "1",
                  "--resolution", "64")
    rows = {row["mode"]: row for row in r["rows"]}
    assert set(rows) == {"reencode", "cached"}
    for row in rows.values():
        assert row["batch"] == 2 and row["images_per_s"] > 0 and row["step_ms"] > 0
    # re-encoding runs the VAE and text encoder too, so it counts more FLOPs per step than the cached step
    assert rows["reencode"]["tflop_per_step"] > rows["cached"]["tflop_per_step"] > 0


def test_blend_latency_times_every_case():
    r = _run_json("blend_latency", "--base", "tiny-random", "--steps", "2", "--repeats", "1", "--threads", "1")
    seconds = r["seconds"]
    for key in ("base", "fused blend, 5 adapters", "PEFT unfused set_adapters, 5 adapters", "change weight (1 of 5)",
                "restore base (5 active -> all 0)"):
        assert seconds[key] > 0, key



@pytest.mark.slow  # ~11 subprocesses that each import torch and diffusers: ~30 s on 2 idle cores, ~50 s on busy ones
def test_gpu_suite_dry_run_runs_every_stage_and_writes_its_report(tmp_path):
    """`make bench-gpu`'s script at toy sizes on the CPU: every stage runs (the peer's side may be absent), the
    report's JSON agrees with formulas computed here, and each goal's verdict follows its target."""
    import shutil
    import subprocess
    import sys

    suite = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")]
    done = subprocess.run([*suite, "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = tmp_path.glob("cpu-dry-run-*.md")
    text = report.read_text()
    results = json.loads(text[text.index("```json") + 7:text.rindex("```")])
    stages = {"facts", "cuda-tests", "train", "peer", "blend", "lowmem", "sdxl", "train-compiled", "blend-compiled"}
    assert set(results) == stages and {r["status"] for r in results.values()} == {"ok"}, results
    assert results["cuda-tests"]["tests"] and set(results["cuda-tests"]["tests"].values()) <= {"SKIPPED", "PASSED"}
    rows = [r for s in ("train", "train-compiled", "sdxl", "lowmem") for r in results[s]["rows"]]
    assert {r["options"] for r in rows} >= {"", "compile", "gradient_checkpointing"}
    for r in rows:  # images/s and step time are one measurement: batch / step time
        assert abs(r["images_per_s"] - r["batch"] * 1000 / r["step_ms"]) < 1e-6 * r["images_per_s"], r
    ours = results["peer"]["ours"]  # our trainer, timed from outside by the optimizer-step hook
    assert ours["optimizer_steps"] == results["peer"]["steps"] == 3 and ours["images_per_s"] > 0, ours
    peer = results["peer"]["peer"]
    assert "images_per_s" in peer or peer.get("skipped"), peer
    seconds = results["blend-compiled"]["seconds"]
    assert seconds["fused blend, 5 adapters (compiled)"] > 0 and results["blend"]["seconds"]["base"] > 0
    assert results["blend-compiled"]["recompilations_after_weight_changes"] == 0
    change = results["blend"]["seconds"]["change weights (5 adapters, all)"]
    verdict = "yes" if change <= 0.1 else "**no**"
    assert f"| weight change (5 adapters) | <= 100 ms | {change * 1e3:.1f} ms | {verdict} |" in text
    assert "| recompilations after weight changes | 0 | 0 | yes |" in text
    # without a GPU the real run refuses at once, says why and what it would have run
    if shutil.which("nvidia-smi") is None:
        refused = subprocess.run(suite, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr
        assert all(name in refused.stderr for name in stages)
