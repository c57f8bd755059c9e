"""vl_core.store: confined names, exclusive numbered names, temp + replace, stale cleanup (pure Python)."""
import os
import subprocess
import sys
import time

import pytest

from vl_core import store

EXT = ".safetensors"


def write_bytes(data: bytes):
    def write(path):
        with open(path, "wb") as f:
            f.write(data)
    return write


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "models" / "vl_embeddings"
    r.mkdir(parents=True)
    return r


@pytest.mark.parametrize("prefix", [".", "./", "", "  ", "sub/.", "././"])
def test_prefix_naming_the_folder_saves_strictly_inside_it(root, prefix):
    name = store.save_numbered(str(root), prefix, EXT, write_bytes(b"x"), default_stem="vl_embeds")
    assert os.path.dirname(name) in ("", "sub") and os.path.basename(name) == "vl_embeds_00001_.safetensors"
    assert (root / name).read_bytes() == b"x"
    assert files_under(root.parent) == [os.path.join("vl_embeddings", name)]  # nothing in the parent


@pytest.mark.parametrize("prefix,rule", [
    ("sub/..", "'..'"), ("../x", "'..'"), ("a/../../x", "'..'"), ("/abs/x", "absolute"), ("C:/x", "absolute"),
    ("a\x00b", "NUL"), ("x" * 200, "longer than"), ("/".join(["d"] * 20), "folder levels"),
    ("a" * 2000, "longer than"), ("con", "reserved"), ("sub/LPT1.txt", "reserved"), ("a|b", "character"),
    ("a\\b", "character"), ("a\nb", "character"), (".hidden", "starts with '.'"), ("sub/ x", "space"),
])
def test_bad_prefixes_are_refused_by_rule_before_anything_is_written(root, prefix, rule):
    with pytest.raises(ValueError) as e:
        store.save_numbered(str(root), prefix, EXT, write_bytes(b"x"))
    assert "filename_prefix" in str(e.value) and rule in str(e.value), str(e.value)
    assert files_under(root.parent) == []


def test_prefix_through_an_existing_file_names_the_rule(root):
    (root / "taken").write_bytes(b"file")
    with pytest.raises(ValueError, match="filename_prefix .*existing file, not a folder"):
        store.save_numbered(str(root), "taken/x", EXT, write_bytes(b"x"))
    assert files_under(root) == ["taken"]


def test_symlinked_folder_leading_outside_is_refused(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ValueError, match="outside"):
        store.save_numbered(str(root), "link/x", EXT, write_bytes(b"x"))
    assert list(outside.iterdir()) == []


def test_numbers_increase_and_never_replace_an_existing_file(root):
    (root / "a_00002_.safetensors").write_bytes(b"theirs")
    names = [store.save_numbered(str(root), "a", EXT, write_bytes(bytes([i]))) for i in range(3)]
    assert names == ["a_00003_.safetensors", "a_00004_.safetensors", "a_00005_.safetensors"]
    assert (root / "a_00002_.safetensors").read_bytes() == b"theirs"
    assert [(root / n).read_bytes() for n in names] == [b"\x00", b"\x01", b"\x02"]


def test_failed_write_leaves_nothing(root):
    def boom(path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        store.save_numbered(str(root), "a", EXT, boom)
    assert files_under(root) == []


def test_a_replaced_reservation_is_not_overwritten(root):
    def steal(path):  # someone swaps the reservation for their own file while we write
        reserved = os.path.join(root, "a_00001_.safetensors")
        os.unlink(reserved)
        with open(reserved, "wb") as f:
            f.write(b"theirs")
        write_bytes(b"ours")(path)
    with pytest.raises(OSError, match="replaced by someone else"):
        store.save_numbered(str(root), "a", EXT, steal)
    assert (root / "a_00001_.safetensors").read_bytes() == b"theirs" and files_under(root) == ["a_00001_.safetensors"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_and_their_empty_reservations_are_cleaned_live_ones_kept(root):
    host = store._host_tag()
    dead = _dead_pid()
    (root / "a_00001_.safetensors").write_bytes(b"")  # reservation of a killed save
    dead_tmp = root / f".a_00001_.safetensors.{host}.{dead}.{'0' * 16}.vltmp"
    dead_tmp.write_bytes(b"partial")
    live_tmp = root / f".b_00001_.safetensors.{host}.{os.getppid()}.{'1' * 16}.vltmp"
    live_tmp.write_bytes(b"writing")
    (root / "b_00001_.safetensors").write_bytes(b"")  # its reservation, in flight
    other_host_tmp = root / f".c_00001_.safetensors.otherhost.{dead}.{'2' * 16}.vltmp"
    other_host_tmp.write_bytes(b"writing elsewhere")
    (root / "kept_00001_.safetensors").write_bytes(b"done")
    assert store.list_files([str(root)], EXT, clean=False) == ["kept_00001_.safetensors"]
    removed = store.clean_stale(str(root))
    assert sorted(os.path.basename(p) for p in removed) == sorted([dead_tmp.name, "a_00001_.safetensors"])
    assert sorted(files_under(root)) == sorted([live_tmp.name, "b_00001_.safetensors", other_host_tmp.name,
                                                "kept_00001_.safetensors"])
    # after the bound, an untouched temp (any owner) and an empty numbered file nobody writes are abandoned
    (root / "d_00001_.safetensors").write_bytes(b"")
    (root / "not_numbered.safetensors").write_bytes(b"")
    store.clean_stale(str(root), now=time.time() + store.STALE_AFTER_S + 10)
    assert sorted(files_under(root)) == ["kept_00001_.safetensors", "not_numbered.safetensors"]


def test_cleanup_never_follows_or_removes_symlinks(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    os.symlink(victim, root / f".x_00001_.safetensors.{store._host_tag()}.{_dead_pid()}.{'0' * 16}.vltmp")
    os.symlink(victim, root / "y_00001_.safetensors")
    store.clean_stale(str(root), now=time.time() + 10 * store.STALE_AFTER_S)
    assert victim.exists() and len(os.listdir(root)) == 2


def test_listing_skips_temps_empty_files_hidden_and_other_extensions(root):
    (root / "sub").mkdir()
    (root / "sub" / "a_00001_.safetensors").write_bytes(b"x")
    (root / "b.safetensors").write_bytes(b"x")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "c.ckpt").write_bytes(b"x")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "d.safetensors").write_bytes(b"x")
    (root / "dir.safetensors").mkdir()
    assert store.list_files([str(root)], EXT) == ["b.safetensors", "sub/a_00001_.safetensors"]


@pytest.mark.parametrize("name,rule", [
    ("../x.safetensors", "'..'"), ("/etc/passwd", "absolute"), ("x.ckpt", "not a .safetensors"),
    ("missing.safetensors", "not found"), ("empty.safetensors", "interrupted"), ("dir.safetensors", "regular"),
    ("a\x00.safetensors", "NUL"), (None, "must be a string"), ("", "folder"), ("link.safetensors", "outside"),
])
def test_resolve_refuses_by_rule(root, tmp_path, name, rule):
    (root / "empty.safetensors").write_bytes(b"")
    (root / "dir.safetensors").mkdir()
    (tmp_path / "out.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "out.safetensors", root / "link.safetensors")
    with pytest.raises(ValueError, match=rule):
        store.resolve_file([str(root)], name, EXT)


def test_resolve_finds_the_file_in_the_first_root_that_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (b / "x.safetensors").write_bytes(b"x")
    assert store.resolve_file([str(a), str(b)], "x.safetensors", EXT) == str((b / "x.safetensors").resolve())


def test_listing_walks_a_symlink_loop_once(root):
    (root / "a").mkdir()
    (root / "a" / "x.safetensors").write_bytes(b"x")
    os.symlink(root / "a", root / "a" / "loop")
    os.symlink(root, root / "a" / "up")
    assert store.list_files([str(root)], EXT) == ["a/x.safetensors"]


def test_broken_link_is_refused_by_rule(root):
    os.symlink(root / "gone.safetensors", root / "dangling.safetensors")
    with pytest.raises(ValueError, match="cannot be opened"):
        store.resolve_file([str(root)], "dangling.safetensors", EXT)


def test_listing_filter_and_header_metadata(root):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(root / "emb.safetensors"), metadata={"vl_embeds": "{}"})
    save_file({"w": torch.zeros(1)}, str(root / "lora.safetensors"))
    (root / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert store.safetensors_metadata(str(root / "emb.safetensors")) == {"vl_embeds": "{}"}
    assert store.safetensors_metadata(str(root / "lora.safetensors")) is None
    assert store.safetensors_metadata(str(root / "junk.safetensors")) is None
    accept = lambda p: "vl_embeds" in (store.safetensors_metadata(p) or {})  # noqa: E731
    assert store.list_files([str(root)], EXT, accept=accept) == ["emb.safetensors"]
