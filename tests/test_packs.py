"""Memory packs (trainer/packs.py, launch/memory.py): bit-exact round trips through a real server process on
loopback, the extractor identity check on import and in colorize, bad files, and the command line."""

from __future__ import annotations

import subprocess
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from studiohelpers import PYTHON, REPO, env, make_checkpoint, tint_image

from launch import memory as memory_cli
from launch.colorize import main as colorize_main
from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from trainer.exemplars import free_slots, memorize_images
from trainer.packs import (
    UNKNOWN,
    Pack,
    PackError,
    PackIdentityWarning,
    checkpoint_identity,
    export_pack,
    import_pack,
    pack_bytes,
    read_pack,
    write_pack,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints whose extractors differ (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("packs")
    return make_checkpoint(root / "a", seed=0), make_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv"), durability="none")
    yield srv
    assert srv.stop() == 0


@pytest.fixture()
def client(server):
    with MemoryClient(server.endpoint, timeout_ms=30000) as c:
        yield c


def _fill(client, name: str, ckpt, n: int = 3, capacity: int = 16) -> np.ndarray:
    """A memory with n exemplars written by ckpt's extractor and one more freed again."""
    from trainer.inference import Colorizer

    col = Colorizer(ckpt, connect_memory=False)
    client.create(capacity=capacity, key_dim=col.extractor_dim, value_dim=313, memory=name)
    rng = np.random.default_rng(5)
    images = [tint_image(c, rng) for c in ((220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40))]
    slots = memorize_images(col.extractor, client, name, images[: n + 1], col.image_size)
    free_slots(client, name, [int(slots[-1])], col.extractor_dim)
    return slots[:n]


def test_round_trip_is_bit_exact(client, ckpts, tmp_path):
    _fill(client, "rt_src", ckpts[0])
    identity, extractor, ckpt_path = checkpoint_identity(ckpts[0])
    before = client.export(memory="rt_src")
    pack = export_pack(client, "rt_src", identity, extractor, ckpt_path, {0: "red.png", 1: "green.png", 9: "x"})
    path = write_pack(pack, tmp_path / "flowers.pack")
    again = read_pack(path)
    assert again.name == "rt_src" and again.identity == identity and again.checkpoint == ckpt_path
    assert again.written == 3 and again.capacity == 16 and again.extractor["backbone"] == "resnet18-scratch"
    # Only names of slots that hold an item are kept.
    assert [s["name"] for s in again.sources] == ["red.png", "green.png"]
    assert again.created.endswith("Z")
    done = import_pack(client, again, name="rt_copy", expected_identity=identity, key_dim=32)
    assert done == {"name": "rt_copy", "capacity": 16, "written": 3, "version": 1}
    after = client.export(memory="rt_copy")
    for key in ("keys", "values", "ages", "item_ids"):
        assert after[key].dtype == before[key].dtype
        assert after[key].tobytes() == before[key].tobytes(), key
    # File -> Pack -> file keeps every array bit and every metadata field.
    third = read_pack(write_pack(again, tmp_path / "again.pack"))
    assert third.metadata() == again.metadata()
    assert all(getattr(third, k).tobytes() == getattr(again, k).tobytes() for k in ("keys", "values", "ages",
                                                                                     "item_ids"))


def test_import_refuses_other_extractor_and_warns_on_unknown(client, ckpts, tmp_path):
    _fill(client, "id_src", ckpts[0])
    ident_a = checkpoint_identity(ckpts[0])[0]
    ident_b = checkpoint_identity(ckpts[1])[0]
    assert ident_a != ident_b and ident_a.startswith("sha256:")
    pack = export_pack(client, "id_src", ident_a)
    names_before = client.info()["memories"]
    with pytest.raises(PackError, match="another extractor"):
        import_pack(client, pack, name="id_b", expected_identity=ident_b)
    assert client.info()["memories"] == names_before  # nothing created
    unknown = export_pack(client, "id_src")
    assert unknown.identity == UNKNOWN
    with pytest.warns(PackIdentityWarning, match="does not say which extractor"):
        import_pack(client, unknown, name="id_unknown", expected_identity=ident_b)
    # Without an expected identity nothing is checked.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_pack(client, pack, name="id_unchecked")


def test_existing_name_needs_replace(client, ckpts):
    _fill(client, "ex_a", ckpts[0], n=2)
    _fill(client, "ex_b", ckpts[0], n=3)
    pack = export_pack(client, "ex_b")
    keep = client.export(memory="ex_a")
    with pytest.raises(PackError, match="already exists"):
        import_pack(client, pack, name="ex_a")
    unchanged = client.export(memory="ex_a")
    assert unchanged["keys"].tobytes() == keep["keys"].tobytes()
    import_pack(client, pack, name="ex_a", replace=True)
    assert client.export(memory="ex_a")["item_ids"].tobytes() == pack.item_ids.tobytes()
    with pytest.raises(PackError, match="64-d keys"):
        import_pack(client, pack, name="ex_c", key_dim=64)


def _pack(m: int = 4, dk: int = 3) -> Pack:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((m, dk)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = np.full((m, 5), 0.2, np.float32)
    return Pack("p", keys, values, np.zeros(m, np.float32), np.arange(m, dtype=np.int64))


@pytest.mark.parametrize("damage, match", [
    (lambda p: setattr(p, "keys", p.keys * 2), "unit norm"),
    (lambda p: p.values.__setitem__((0, 0), -0.1), "distribution"),
    (lambda p: p.ages.__setitem__(1, np.nan), "NaN"),
    (lambda p: setattr(p, "item_ids", p.item_ids[:2]), "inconsistent shapes"),
    (lambda p: setattr(p, "item_ids", p.item_ids.astype(np.int32)), "int64"),
    (lambda p: setattr(p, "name", ""), "no memory name"),
])
def test_invalid_pack_is_refused_before_writing(tmp_path, damage, match):
    pack = _pack()
    damage(pack)
    with pytest.raises(PackError, match=match):
        write_pack(pack, tmp_path / "x.pack")
    assert not (tmp_path / "x.pack").exists()


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "photo.pack"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PackError, match="photo.pack is not a readable pack"):
        read_pack(bad)
    with pytest.raises(PackError, match="does not exist"):
        read_pack(tmp_path / "missing.pack")
    good = write_pack(_pack(), tmp_path / "good.pack")
    data = good.read_bytes()
    (tmp_path / "cut.pack").write_bytes(data[: len(data) - 7])
    with pytest.raises(PackError, match="cut.pack"):
        read_pack(tmp_path / "cut.pack")
    import safetensors.numpy
    (tmp_path / "plain.safetensors").write_bytes(safetensors.numpy.save({"keys": np.zeros((1, 2), np.float32)}))
    with pytest.raises(PackError, match="not a memory pack"):
        read_pack(tmp_path / "plain.safetensors")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_pack_bytes_raise_pack_error_only(tmp_path, data):
    """Any corruption of a valid file is either still a valid pack or a PackError: never another exception."""
    raw = bytearray(pack_bytes(_pack()))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path = tmp_path / "fuzz.pack"
    path.write_bytes(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))
    try:
        pack = read_pack(path)
    except PackError:
        return
    assert pack.keys.shape[0] == pack.values.shape[0] == pack.ages.shape[0] == pack.item_ids.shape[0] >= 1


@given(st.lists(st.tuples(st.integers(0, 10**6), st.text(min_size=1, max_size=30).filter(
    lambda s: s.strip() and "\n" not in s and "\r" not in s and s == s.strip() and not any(
        c in s for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))), max_size=20))
def test_sources_parser_reads_memorize_output(rows):
    text = "created memory 'x' on tcp://127.0.0.1:1: 1024 slots\n"
    text += "".join(f"slot {slot:6d}  {name}\n" for slot, name in rows)
    text += f"memorized {len(rows)} of {len(rows)} images into memory 'x' on tcp://127.0.0.1:1\n"
    assert memory_cli.parse_sources(text) == dict(rows)


def test_cli_export_import_and_colorize_with_a_pack(client, server, ckpts, tmp_path, capsys):
    slots = _fill(client, "cli_src", ckpts[0])
    sources = tmp_path / "memorize.log"
    sources.write_text("".join(f"slot {s:6d}  photos/ex{i}.png\n" for i, s in enumerate(slots.tolist())))
    out = tmp_path / "cli.pack"
    assert memory_cli.main(["pack", "export", "--checkpoint", str(ckpts[0]), "--memory", server.endpoint,
                            "--name", "cli_src", "--output", str(out), "--sources", str(sources)]) == 0
    assert "3 of 16 slots written, 3 named" in capsys.readouterr().out
    assert memory_cli.main(["pack", "info", str(out)]) == 0
    assert "photos/ex0.png" in capsys.readouterr().out
    # Import as a new name, checked against the right and the wrong checkpoint.
    assert memory_cli.main(["pack", "import", "--input", str(out), "--memory", server.endpoint,
                            "--name", "cli_b", "--checkpoint", str(ckpts[1])]) == 2
    assert "another extractor" in capsys.readouterr().err
    assert "cli_b" not in client.info()["memories"]
    assert memory_cli.main(["pack", "import", "--input", str(out), "--memory", server.endpoint,
                            "--checkpoint", str(ckpts[0])]) == 2
    assert "already exists" in capsys.readouterr().err
    assert memory_cli.main(["pack", "import", "--input", str(out), "--memory", server.endpoint,
                            "--name", "cli_a", "--checkpoint", str(ckpts[0])]) == 0
    # An export without --checkpoint says its extractor is unknown; importing it with one warns.
    anon = tmp_path / "anon.pack"
    assert memory_cli.main(["pack", "export", "--memory", server.endpoint, "--name", "cli_src",
                            "--output", str(anon)]) == 0
    capsys.readouterr()
    assert memory_cli.main(["pack", "import", "--input", str(anon), "--memory", server.endpoint,
                            "--name", "cli_anon", "--checkpoint", str(ckpts[0])]) == 0
    assert "warning: pack" in capsys.readouterr().err

    # colorize --memory PACK equals colorize against the live server holding the same memory.
    photo = tmp_path / "in" / "g.png"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 44), dtype=np.uint8), "L").save(photo)
    assert colorize_main(["--checkpoint", str(ckpts[0]), "--input", str(photo), "--output", str(tmp_path / "o1"),
                          "--memory", str(out)]) == 0
    assert colorize_main(["--checkpoint", str(ckpts[0]), "--input", str(photo), "--output", str(tmp_path / "o2"),
                          "--memory", server.endpoint, "--memory-name", "cli_a"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "g.png")) for d in ("o1", "o2"))
    assert a.shape == (30, 44, 3) and np.array_equal(a, b)
    assert colorize_main(["--checkpoint", str(ckpts[1]), "--input", str(photo), "--output", str(tmp_path / "o3"),
                          "--memory", str(out)]) == 2
    assert "another extractor" in capsys.readouterr().err
    assert colorize_main(["--checkpoint", str(ckpts[0]), "--input", str(photo), "--output", str(tmp_path / "o4"),
                          "--memory", str(tmp_path / "nope.pack")]) == 2
    assert "neither a server endpoint" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    """`pccnet-memory` as installed by `make install` (a real process)."""
    exe = REPO / ".venv" / "bin" / "pccnet-memory"
    cmd = [str(exe)] if exe.exists() else [PYTHON, "-m", "launch.memory"]
    write_pack(_pack(), tmp_path / "p.pack")
    res = subprocess.run([*cmd, "pack", "info", str(tmp_path / "p.pack")], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pccnet-memory-pack" in res.stdout and "written" in res.stdout


def test_memorized_keys_are_formed_like_the_queries(client, ckpts):
    """With retrieval.flip (the default) a query is the mean of the image's and its mirror's features; an
    exemplar's key is formed the same way, so a mirrored photo finds its exemplar at similarity 1."""
    from trainer.images import image_to_sample
    from trainer.inference import Colorizer
    from trainer.retrieval import query_features

    col = Colorizer(ckpts[0], connect_memory=False)
    img = tint_image((200, 80, 40), np.random.default_rng(11))
    mirror = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    light = torch.stack([image_to_sample(i, col.image_size)["light"] for i in (img, mirror)])
    keys = {}
    for flip in (False, True):
        name = f"flip-{flip}"
        client.create(capacity=4, key_dim=col.extractor_dim, value_dim=313, memory=name)
        slots = memorize_images(col.extractor, client, name, [img, mirror], col.image_size, flip=flip)
        keys[flip] = client.get(slots, memory=name)["keys"]
        with torch.no_grad():
            want = query_features(col.extractor, light, flip).numpy()
        np.testing.assert_allclose(keys[flip], want, atol=1e-5)
    np.testing.assert_allclose(keys[True][0], keys[True][1], atol=1e-5)  # mirror-invariant
    assert np.abs(keys[False][0] - keys[False][1]).max() > 1e-3  # the plain key is not
