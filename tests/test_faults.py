"""Faults and hostile state (issue #22): full disks, damaged caches, base folders and checkpoints, odd config
values and tensor dtypes, SIGTERM mid-run. Each fault ends in a message naming the file and the fix, never a raw
traceback, a hang, silently wrong training, or a partial file where a complete one is expected."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stylelora import atomic, checkpoint, cli
from stylelora.config import ConfigError, TrainConfig
from stylelora.errors import AdapterError, NoSpaceError, TrainingError
from stylelora.training import train

REPO = Path(__file__).resolve().parents[1]


def quick_config(folder, output, **run) -> TrainConfig:
    run = {"steps": 2, "batch_size": 2, "base": "tiny-random", "cache_dir": str(Path(output).parent / "cache"), **run}
    return TrainConfig().replace(folder=str(folder), trigger="zzstyle", resolution=128, rank=4, output=str(output),
                                 **run)


def leftovers(folder: Path) -> list[str]:
    """Temporaries of stylelora.atomic (".<name>.<hex>.tmp/.old") left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.suffix in (".tmp", ".old"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- disk full
def enospc_after(limit: int):
    """A stand-in for Path.write_bytes that writes ``limit`` bytes and then fails as a full disk does."""
    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[:limit])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_bytes


def test_full_disk_keeps_the_previous_file_and_names_the_folder(tmp_path, monkeypatch):
    dest = tmp_path / "out" / "a.bin"
    atomic.write_bytes(dest, b"old complete content")
    monkeypatch.setattr(Path, "write_bytes", enospc_after(4))
    with pytest.raises(NoSpaceError, match=f"no space left on {dest.parent}") as e:
        atomic.write_bytes(dest, b"new content that does not fit")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC  # callers catching OSError still do
    monkeypatch.undo()
    assert dest.read_bytes() == b"old complete content"
    assert leftovers(dest.parent) == []


def test_torch_write_failure_on_a_full_disk_is_named_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    """torch's zip writer loses the errno ("enforce fail at inline_container.cc"); with no space left on the
    folder it is reported as a full disk, and the checkpoint folder is not created half-written."""
    root = tmp_path / "ckpts"
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    opt = torch.optim.AdamW(params.values(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(params=params, optimizer=opt, lr_scheduler=sched, scaler=None, state={"config": {}}, keep=5)
    checkpoint.save(root, 1, **kw)

    def torch_save(obj, path, *a, **k):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256")

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(3 << 20, 3 << 20, 0))
    with pytest.raises(NoSpaceError, match=f"no space left on {root}"):
        checkpoint.save(root, 2, **kw)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == ["step-000001"]
    assert leftovers(root) == [] and checkpoint.damage(root / "step-000001") is None


def test_other_torch_runtime_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def torch_save(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256")

    monkeypatch.setattr(torch, "save", torch_save)  # plenty of free space on tmp_path: not a full disk
    with pytest.raises(RuntimeError, match="inline_container") as e:
        with atomic.atomic_path(tmp_path / "x.pt") as tmp:
            torch.save({}, tmp)
    assert not isinstance(e.value, NoSpaceError)


def test_training_on_a_full_disk_says_so_and_leaves_no_partial_adapter(style_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run" / "a.safetensors"
    real = Path.write_bytes

    def write_bytes(self, data):  # only the adapter's temporary fails; caches and checkpoints are written
        if self.name.startswith(".a.safetensors."):
            return enospc_after(100)(self, data)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    rc = cli.main(["train", str(style_dir), "-o", str(out), "--base", "tiny-random", "--trigger", "zzstyle",
                   "--resolution", "128", "--rank", "4", "--steps", "2", "--batch-size", "2",
                   "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: no space left on {out.parent}" in err and "a.safetensors" in err, err
    assert "Traceback" not in err and "Errno" not in err
    assert not out.exists() and leftovers(out.parent) == []


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``where``; the reason it cannot be done here, or None."""
    if shutil.which("mount") is None:
        return "no mount command"
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    return None if p.returncode == 0 else f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}"


@pytest.mark.parametrize("free_kib,fails_in", [(48, "SafetensorError"),  # no room for the checkpoint's LoRA
                                               (200, "RuntimeError")])   # ... nor for torch.save's train_state
def test_training_into_a_real_full_tmpfs(style_dir, tmp_path, free_kib, fails_in):
    """The real thing: safetensors' and torch's own errors on a 3 MB tmpfs filled up to its last few KB."""
    disk = tmp_path / "small"
    why = _mount_tmpfs(disk, "3m")
    if why:
        pytest.skip(why)
    try:
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - free_kib * 1024))
        out = disk / "a.safetensors"
        with pytest.raises(NoSpaceError, match=f"no space left on {disk}") as e:
            train(quick_config(style_dir, out, checkpoint_every=1, cache_dir=str(tmp_path / "c")))
        assert type(e.value.__cause__).__name__ == fails_in, repr(e.value.__cause__)
        assert not out.exists() and not (disk / "a-checkpoints" / "step-000001").exists()
        assert leftovers(disk) == [] and leftovers(disk / "a-checkpoints") == []
    finally:
        gc.collect()  # torch's writer keeps its file open until collected after a failed save: "target is busy"
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # detach now, freed once the last file closes


# ------------------------------------------------------------------------------------------- built-in base
def test_tiny_base_is_never_left_half_written_and_a_damaged_one_is_rebuilt(tmp_path, monkeypatch, caplog):
    from diffusers import StableDiffusionPipeline

    from stylelora import models

    monkeypatch.setenv("STYLELORA_HOME", str(tmp_path / "home"))
    target = models.tiny_path("tiny-random")
    real_save = StableDiffusionPipeline.save_pretrained

    def full_disk(self, folder, **kw):  # what a full $STYLELORA_HOME did: empty files, then ENOSPC
        for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_disk)
    with pytest.raises(NoSpaceError, match=f"no space left on {target.parent}"):
        models.ensure_tiny("tiny-random")
    assert not target.exists() and leftovers(target.parent) == []

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", real_save)
    models.ensure_tiny("tiny-random")
    good = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    # damage as a crash before the data reached the disk (or an older non-atomic build) left it
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors"):
        (target / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="stylelora.models"):
        base = models.load_base("tiny-random")
    assert "damaged" in caplog.text and "model_index.json" in caplog.text
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == good
    json.loads((target / "model_index.json").read_text())  # the JSONDecodeError of the issue is gone
    assert base.pipe.unet is not None

    # a folder built before manifests existed, intact, is kept (not rebuilt); a damaged one is rebuilt
    (target / models.TINY_MANIFEST).unlink()
    before = (target / "unet" / "config.json").stat().st_ino
    models.ensure_tiny("tiny-random")
    assert (target / "unet" / "config.json").stat().st_ino == before and (target / models.TINY_MANIFEST).exists()


# ------------------------------------------------------------------------------------------- cache entries
def test_cache_entries_swapped_or_rewritten_are_detected(tmp_path, caplog):
    from stylelora.cache import TensorCache

    cache = TensorCache(tmp_path, "latents")
    a, b = TensorCache.key("a"), TensorCache.key("b")
    ta, tb = {"mean": torch.zeros(4, 2, 2)}, {"mean": torch.ones(4, 2, 2)}
    cache.put(a, ta)
    cache.put(b, tb)
    assert torch.equal(cache.get(a)["mean"], ta["mean"])
    # swapped files: each is a valid entry, of the right shape, under the other's name
    pa, pb = cache.path(a), cache.path(b)
    tmp = pa.with_suffix(".swap")
    os.replace(pa, tmp), os.replace(pb, pa), os.replace(tmp, pb)
    with caplog.at_level(logging.WARNING, logger="stylelora.cache"):
        assert cache.get(a) is None and cache.get(b) is None
    assert str(pa) in caplog.text and "another key" in caplog.text
    # rewritten with other tensors of the right shape, keeping the metadata: the checksum no longer matches
    cache.put(a, ta)
    with safe_open(str(pa), "pt") as f:
        meta = f.metadata()
    save_file({"mean": torch.rand(4, 2, 2)}, str(pa), metadata=meta)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stylelora.cache"):
        assert cache.get(a) is None
    assert "checksum" in caplog.text
    assert cache.stats.damaged == 3


def test_damaged_latent_entries_are_reencoded(tiny_base, style_dir, tmp_path, caplog):
    """Entries swapped between images, or of a wrong shape with a valid key and checksum, are re-encoded: the
    latents trained on equal those a clean cache gives (before: silently wrong latents, or a raw
    'stack expects each tensor to be equal size')."""
    from stylelora.cache import tensors_digest
    from stylelora.data import scan_folder
    from stylelora.dataset import TrainingSet
    from stylelora.config import DataConfig

    cfg = DataConfig(folder=str(style_dir), trigger="zzstyle", resolution=128)

    def prepared(root):
        ts = TrainingSet(scan_folder(style_dir, trigger="zzstyle"), cfg, tiny_base.pipe, cache_root=root,
                         cache_text=False, device=torch.device("cpu"), weight_dtype=torch.float32)
        ts.prepare()
        return ts

    clean = prepared(tmp_path / "clean")
    entries = sorted((tmp_path / "clean" / "latents").rglob("*.safetensors"))
    assert len(entries) == len(clean.items) == 4
    # swap the entries of two images of different size, and give a third a wrong-shaped latent
    first, second, third = entries[0], entries[1], entries[2]
    tmp = first.with_suffix(".swap")
    os.replace(first, tmp), os.replace(second, first), os.replace(tmp, second)
    with safe_open(str(third), "pt") as f:
        key = f.metadata()["stylelora.cache_key"]
        bad = {k: f.get_tensor(k) for k in f.keys()}
    bad["mean"], bad["std"] = torch.zeros(bad["mean"].shape[0], 3, 3), torch.ones(bad["mean"].shape[0], 3, 3)
    save_file(bad, str(third), metadata={"stylelora.cache_key": key, "stylelora.sha256": tensors_digest(bad)})

    with caplog.at_level(logging.WARNING, logger="stylelora.cache"):
        again = prepared(tmp_path / "clean")
    assert again.latent_cache.stats.damaged == 3 and again.latent_cache.stats.misses == 3
    assert "shape" in caplog.text
    reference = prepared(tmp_path / "fresh")  # a cache never damaged
    for k in reference._latents:
        for name in ("mean", "std", "orig", "crop"):
            assert torch.equal(again._latents[k][name], reference._latents[k][name]), (k, name)
    same_bucket = [i for i, b in enumerate(again.buckets) if b == again.buckets[0]]
    assert again.batch(same_bucket, torch.Generator().manual_seed(0))["latents"].shape[0] == len(same_bucket) > 1


# ------------------------------------------------------------------------------------------- checkpoints
def _ckpts(tmp_path, steps=(1, 2, 3)) -> Path:
    root = tmp_path / "x-checkpoints"
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    opt = torch.optim.AdamW(params.values(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in steps:
        params["w"].grad = torch.full((3,), float(step))
        opt.step()
        checkpoint.save(root, step, params=params, optimizer=opt, lr_scheduler=sched, scaler=None,
                        state={"config": {}}, keep=5)
    return root


def test_truncated_checkpoint_is_named_and_the_previous_one_offered(tmp_path):
    root = _ckpts(tmp_path)
    newest = root / "step-000003"
    data = (newest / "train_state.pt").read_bytes()
    (newest / "train_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError) as e:
        checkpoint.load(newest)
    msg = str(e.value)
    assert f"checkpoint {newest} is damaged" in msg and "train_state.pt" in msg
    assert f"--resume {root / 'step-000002'}" in msg and "PytorchStreamReader" not in msg
    with pytest.raises(TrainingError, match="step-000002"):
        checkpoint.find(str(newest), root)


def test_checkpoint_damaged_under_the_same_size_is_detected(tmp_path):
    root = _ckpts(tmp_path, steps=(1, 2))
    f = root / "step-000002" / "lora.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: still a valid file, wrong numbers
    f.write_bytes(bytes(data))
    assert "checksum" in checkpoint.damage(root / "step-000002")
    assert checkpoint.damage(root / "step-000001") is None
    assert checkpoint.find("latest", root) == root / "step-000001"


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(style_dir, tmp_path, caplog, capsys):
    out = tmp_path / "x.safetensors"
    train(quick_config(style_dir, out, steps=2, checkpoint_every=1))
    root = out.parent / "x-checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]
    (root / "step-000002" / "train_state.pt").write_bytes(b"PK\x03\x04")  # truncated
    out.unlink()
    with caplog.at_level(logging.WARNING, logger="stylelora.checkpoint"):
        train(quick_config(style_dir, out, steps=3, checkpoint_every=1, resume="latest"))
    assert "step-000002 is damaged" in caplog.text
    assert f"resumed from {root / 'step-000001'} at step 1" in capsys.readouterr().out
    assert out.exists() and checkpoint.damage(root / "step-000003") is None


# ------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("table,line,words", [
    ("run", "steps = 2.5", "steps must be an integer, got 2.5"),
    ("data", "resolution = 64.0", "resolution must be an integer, got 64.0 (float) (write 64)"),
    ("network", "rank = 8.0", "rank must be an integer"),
    ("run", "steps = 1e30", "steps must be an integer"),
    ("data", "resolution = 2e9", "resolution must be an integer"),
    ("run", "steps = 100000000", "steps must be in 1..10000000"),
    ("data", "resolution = 100032", "resolution must be in 64..4096"),
    ("data", "resolution = 2147483648", "resolution must be in 64..4096"),
    ("optim", 'lr = "1e-4"', "lr must be a number, got '1e-4' (str)"),
    ("optim", "lr = inf", "lr must be a finite number"),
    ("optim", "warmup_steps = true", "warmup_steps must be an integer, got True"),
    ("data", "trigger = 5", "trigger must be a string or none"),
])
def test_config_values_of_the_wrong_type_or_size_are_refused_by_name(tmp_path, table, line, words):
    path = tmp_path / "t.toml"
    path.write_text(f"[{table}]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(path)
    assert str(path) in str(e.value) and f"[{table}]" in str(e.value) and words in str(e.value), str(e.value)


def test_flags_and_assignments_share_the_bounds(capsys):
    rc = cli.main(["train", "imgs", "--resolution", "100032"])
    assert rc == 2 and "resolution must be in 64..4096" in capsys.readouterr().err
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="steps must be an integer"):
        cfg.run.steps = 2.5
    assert cfg.run.steps == TrainConfig().run.steps
    cfg.optim.lr = 1  # an integer is a number
    assert cfg.optim.lr == 1


# ------------------------------------------------------------------------------------------- tensor dtypes
def _adapter_file(tiny_base, tmp_path) -> tuple[Path, dict]:
    from test_formats import make_adapter, tiny_meta

    from stylelora.formats import save_adapter

    path = save_adapter(make_adapter(tiny_base.pipe), tmp_path / "a.safetensors", metadata=tiny_meta())
    with safe_open(str(path), "pt") as f:
        return path, f.metadata()


def test_fp8_adapters_are_upcast(tiny_base, tmp_path, capsys):
    from stylelora.formats import load_adapter

    path, meta = _adapter_file(tiny_base, tmp_path)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") else v) for k, v in load_file(str(path)).items()}
    save_file(fp8, str(path), metadata=meta)
    adapter = load_adapter(path)
    # the reference: torch's own fp8 → fp32 conversion of the stored tensors
    down_key = next(k for k in fp8 if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    found = [m.down for mods in adapter.modules.values() for m in mods.values()
             if m.down.shape == fp8[down_key].shape and torch.equal(m.down, fp8[down_key].float())]
    assert found and found[0].dtype == torch.float32
    assert cli.main(["inspect", str(path), "--no-hash"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("dtype,name", [(torch.bool, "BOOL"), (torch.int64, "I64"), (torch.uint8, "U8")])
def test_adapters_with_bool_or_integer_tensors_are_refused_by_key_and_dtype(tiny_base, tmp_path, dtype, name,
                                                                            capsys):
    from stylelora.formats import load_adapter

    path, meta = _adapter_file(tiny_base, tmp_path)
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(AdapterError, match=f"{key}.*{name}"):
        load_adapter(path)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and name in err and "Traceback" not in err and "NotImplementedError" not in err


# ------------------------------------------------------------------------------------------- signals
TERM_WORKER = """
import functools, os, signal, sys
from stylelora import cli, training

def on_step(info):
    if info.step == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler or `docker stop` sends, while step 2 is next

training.train = functools.partial(training.train, on_step=on_step)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(style_dir, tmp_path):
    out = tmp_path / "s.safetensors"
    args = ["train", str(style_dir), "-o", str(out), "--base", "tiny-random", "--trigger", "zzstyle",
            "--resolution", "128", "--rank", "4", "--steps", "4", "--batch-size", "2",
            "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", TERM_WORKER, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert "SIGTERM" in p.stderr and "--resume latest" in p.stderr and "Traceback" not in p.stderr, p.stderr
    root = tmp_path / "s-checkpoints"
    # the step under way when the signal came is finished and checkpointed; no adapter is written
    assert [c.name for c in checkpoint.list_checkpoints(root)] == ["step-000002"] and "step 2" in p.stderr
    assert checkpoint.damage(root / "step-000002") is None and not out.exists()
    r = subprocess.run([sys.executable, "-m", "stylelora", *args, "--resume", "latest"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {root / 'step-000002'} at step 2" in r.stdout and out.exists()


def test_signal_handlers_are_restored_after_training():
    from stylelora.cli.train import _StopOnSignal

    before = {s: signal.getsignal(s) for s in _StopOnSignal.SIGNALS}
    with _StopOnSignal() as stop:
        assert all(signal.getsignal(s) != before[s] for s in before)
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt, a stop request instead
        assert stop.requested() and stop.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before
