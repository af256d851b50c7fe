"""The one atomic-write helper and the one safetensors reader, checked against the filesystem and raw bytes."""
import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from stylelora import atomic, checkpoint
from stylelora.adapter import Adapter, LoraModule
from stylelora.blend import file_digests
from stylelora.errors import AdapterError, ModelError
from stylelora.formats import read_metadata, save_adapter
from stylelora.generate import save_png
from stylelora.tensorfile import open_safetensors, read_safetensors

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


class Boom(Exception):
    pass


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def small_adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    return Adapter({"unet": {Q: LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 1.0)}})


# ------------------------------------------------------------------------------------------------- atomic
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(Boom):
        with atomic.atomic_path(dest) as tmp:
            tmp.write_bytes(b"half of the new")
            raise Boom
    assert dest.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_new_files_get_normal_permissions_honoring_umask(tmp_path, umask022):
    assert mode(atomic.write_bytes(tmp_path / "new.bin", b"x")) == 0o644  # not mkstemp's 0600
    os.umask(0o077)
    assert mode(atomic.write_text(tmp_path / "private.txt", "x")) == 0o600
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    os.chmod(kept, 0o640)
    atomic.write_bytes(kept, b"new", fsync=True)  # rewriting keeps the file's own permissions
    assert kept.read_bytes() == b"new" and mode(kept) == 0o640


def test_copy_file_into_new_folder(tmp_path, umask022):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))  # several copy chunks
    dest = atomic.copy_file(src, tmp_path / "lib" / "copy.bin", fsync=True)
    assert dest.read_bytes() == src.read_bytes() and mode(dest) == 0o644
    assert os.listdir(tmp_path / "lib") == ["copy.bin"]


def test_folder_replaced_only_when_the_new_one_is_complete(tmp_path, umask022):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "w.txt").write_text("v1")
    with pytest.raises(Boom):
        with atomic.atomic_folder(dest) as tmp:
            (tmp / "w.txt").write_text("half")
            raise Boom
    assert (dest / "w.txt").read_text() == "v1" and os.listdir(tmp_path) == ["model"]
    with atomic.atomic_folder(dest, fsync=True) as tmp:
        (tmp / "w.txt").write_text("v2")
    assert (dest / "w.txt").read_text() == "v2" and os.listdir(dest) == ["w.txt"]
    assert os.listdir(tmp_path) == ["model"] and mode(dest) == 0o755  # not mkdtemp's 0700


def test_file_replaces_a_folder_of_the_same_name(tmp_path):
    dest = tmp_path / "x.safetensors"
    dest.mkdir()
    atomic.write_bytes(dest, b"file")
    assert dest.read_bytes() == b"file" and os.listdir(tmp_path) == ["x.safetensors"]


def test_save_png_failure_keeps_previous_image(tmp_path):
    from PIL import Image

    out = save_png(Image.new("RGB", (4, 4), (255, 0, 0)), tmp_path / "o.png")
    before = out.read_bytes()

    class Broken:
        info = {"parameters": "x"}

        def save(self, fp, **kw):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise Boom

    with pytest.raises(Boom):
        save_png(Broken(), out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["o.png"]
    assert Image.open(out).getpixel((0, 0)) == (255, 0, 0)


def test_saved_adapter_is_durable_and_world_readable(tmp_path, umask022, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    f = save_adapter(small_adapter(), tmp_path / "a.safetensors")
    assert synced and mode(f) == 0o644 and os.listdir(tmp_path) == ["a.safetensors"]


def test_checkpoint_rewrite_of_a_step_leaves_one_complete_folder(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for value in (1.0, 2.0):
        path = checkpoint.save(tmp_path, 5, params={"w": torch.full((3,), value)}, optimizer=opt,
                               lr_scheduler=sched, scaler=None, state={"note": value}, keep=2)
    assert os.listdir(tmp_path) == ["step-000005"] and checkpoint.list_checkpoints(tmp_path) == [path]
    state, params, _ = checkpoint.load(path)
    assert state == {"note": 2.0, "step": 5} and torch.equal(params["w"], torch.full((3,), 2.0))


# ------------------------------------------------------------------------------------------------- reader
def raw_header(path) -> tuple[int, dict]:
    """The header as the safetensors spec defines it: 8-byte little-endian length, then JSON."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def test_reader_entries_and_metadata_match_the_raw_header(tmp_path):
    f = tmp_path / "t.safetensors"
    tensors = {"a.weight": torch.randn(3, 4).half(), "b.alpha": torch.tensor(4.0), "c": torch.arange(6).reshape(2, 3)}
    save_file(tensors, str(f), metadata={"k": "v"})
    _, header = raw_header(f)
    with open_safetensors(f, floats_only=False) as st:  # "c" is an integer tensor, refused by default
        assert st.metadata == header.pop("__metadata__") == {"k": "v"}
        assert {k: st.entry(k) for k in st.keys()} == {k: (v["shape"], v["dtype"]) for k, v in header.items()}
    got, _ = read_safetensors(f, floats_only=False)
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)


def test_digests_hash_the_bytes_after_the_header(tmp_path):
    f = save_adapter(small_adapter(), tmp_path / "a.safetensors")
    n, _ = raw_header(f)
    data = f.read_bytes()
    whole, body = file_digests(f)
    assert whole == hashlib.sha256(data).hexdigest() and body == hashlib.sha256(data[8 + n:]).hexdigest()
    assert body == read_metadata(f)["sshs_model_hash"]  # kohya hashes the same tensor bytes
    pt = tmp_path / "a.pt"
    torch.save({"x": torch.ones(2)}, pt)
    assert file_digests(pt) == (hashlib.sha256(pt.read_bytes()).hexdigest(),) * 2  # a pickle has no header


def test_reader_errors_use_the_callers_error_class(tmp_path):
    f = tmp_path / "base.safetensors"
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="base.safetensors.*exceeds"):
        read_safetensors(f, error=ModelError)
    with pytest.raises(AdapterError, match="does not exist"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(AdapterError, match="not a safetensors"):
        file_digests(f)
