"""Image files the nodes write and read: confined to their folders, checked before any byte is written
or decoded, ComfyUI's file mode and prefix variables (issue 10 items 1, 3, 5; issue 11 items 3, 4, 10)."""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdxl_nodes.nodes import environment, images
from sdxl_nodes.nodes.environment import NodeInputError
from sdxl_nodes.runtime.limits import Limits


@pytest.fixture
def env(tmp_path, monkeypatch):
    root = tmp_path / "root"
    e = environment.configure(input_dir=root / "input", output_dir=root / "output", temp_dir=root / "temp")
    (root / "input").mkdir(parents=True)
    return e


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _save(prefix, n=1, h=16, w=24):
    return images.SaveImage().run(torch.rand(n, h, w, 3), filename_prefix=prefix)["ui"]["images"]


@pytest.mark.parametrize("prefix", ["", ".", "./", "sub/..", "sub/../.", "..", "../x", "/tmp/x", "sub/../../x"])
def test_prefix_outside_or_equal_to_the_output_folder_writes_nothing(env, prefix, tmp_path):
    # Issue 10 item 1: "", ".", "./", "sub/..", "sub/../." wrote output_00001_.png BESIDE the output folder.
    before = _files(tmp_path)
    with pytest.raises(NodeInputError, match="does not name a file inside the output folder"):
        _save(prefix)
    assert _files(tmp_path) == before  # not even the subfolder was created


def test_prefix_through_a_symlinked_subfolder_is_refused(env, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env.output_dir.mkdir(parents=True)
    (env.output_dir / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(NodeInputError, match="does not name a file inside"):
        _save("link/x")
    assert list(outside.iterdir()) == []


def test_prefix_with_subfolders_and_glob_characters_counts_on(env):
    # Catches a counter that globs the stem: "x[1]" as a glob pattern matches "x1", so the second save
    # started at 00001 again and replaced the first image.
    first = _save("a/b/x[1]", n=2)
    second = _save("a/b/x[1]")
    assert [i["filename"] for i in first + second] == ["x[1]_00001_.png", "x[1]_00002_.png", "x[1]_00003_.png"]
    assert {i["subfolder"] for i in first + second} == {"a/b"}
    assert _files(env.output_dir / "a" / "b") == {"x[1]_00001_.png", "x[1]_00002_.png", "x[1]_00003_.png"}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_png_mode_follows_the_umask_like_comfyui(env, umask):
    # Issue 11 item 3: mkstemp made every PNG 0600; ComfyUI's files are 0666 minus the umask.
    old = os.umask(umask)
    try:
        saved = _save("m")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((env.output_dir / saved[0]["filename"]).stat().st_mode)
    assert mode == 0o666 & ~umask


def test_a_failed_write_leaves_no_partial_and_no_half_file(env, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save("p")
    assert _files(env.output_dir) == set()


def test_prefix_variables_are_resolved_as_comfyui_does(env):
    # Issue 11 item 4: "%width%" & co. stayed literal. Expected strings derived by hand from ComfyUI's
    # folder_paths.compute_vars: width = image width, zero-padded two-digit date parts, 4-digit year.
    now = time.struct_time((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    assert images.resolve_prefix_vars("%year%-%month%-%day%/%hour%%minute%%second%_%width%x%height%%", 640, 480,
                                      now) == "2026-03-04/050607_640x480%"
    assert images.resolve_prefix_vars("%Year%%widths%", 1, 2, now) == "%Year%%widths%"  # exact names only
    saved = _save("%year%/img_%width%x%height%", h=16, w=24)
    assert saved[0]["subfolder"] == str(time.localtime().tm_year)
    assert saved[0]["filename"] == "img_24x16_00001_.png"


def test_filename_prefix_over_the_limit_is_refused_before_any_work(env):
    # Issue 10 item 3: a 10 MB prefix cost 139 s and 1.5 GB in the regex and glob.
    with pytest.raises(NodeInputError, match="filename_prefix_chars is 256"):
        _save("x" * 10_000_000)
    assert not env.output_dir.exists()


def test_saved_is_logged_at_debug_inside_comfyui(env, caplog):
    # Issue 11 item 10: ComfyUI's console got one INFO line per image.
    with caplog.at_level(logging.INFO, logger="sdxl_nodes.nodes.images"):
        _save("standalone")
    assert [r.levelno for r in caplog.records if r.getMessage().startswith("saved")] == [logging.INFO]
    caplog.clear()
    env.inside_comfyui = True
    with caplog.at_level(logging.DEBUG, logger="sdxl_nodes.nodes.images"):
        _save("inside")
    assert [r.levelno for r in caplog.records if r.getMessage().startswith("saved")] == [logging.DEBUG]


# --- reading ------------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG file that declares width×height (a decompression bomb's header; its data is never read)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [13_000, 30_000])
def test_oversized_images_are_refused_from_the_header(env, side):
    # Issue 10 item 5: 13000² passed, 30000² (PIL's own bomb error) gave a traceback.
    _png_header_only(env.input_dir / "bomb.png", side, side)
    message = images.LoadImage.VALIDATE_INPUTS("bomb.png")
    assert isinstance(message, str) and "image_pixels" in message
    with pytest.raises(NodeInputError, match="image_pixels"):
        images.LoadImage().run("bomb.png")


def test_image_pixels_limit_is_the_configured_one(env):
    env.limits = Limits(image_pixels=400)
    Image.new("RGB", (20, 20)).save(env.input_dir / "ok.png")
    Image.new("RGB", (21, 20)).save(env.input_dir / "big.png")
    assert images.LoadImage.VALIDATE_INPUTS("ok.png") is True
    assert images.LoadImage().run("ok.png")[0].shape == (1, 20, 20, 3)
    assert "420 pixels; the limit image_pixels is 400" in images.LoadImage.VALIDATE_INPUTS("big.png")
    with pytest.raises(NodeInputError, match="image_pixels"):
        images.VAEEncode().run(None, torch.zeros(2, 16, 16, 3))  # 512 pixels in the batch


def test_load_image_does_not_follow_a_symlink_out_of_the_input_folder(env, tmp_path):
    # Issue 10 item 5: LoadImage followed links that /api/view refuses.
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    (env.input_dir / "link.png").symlink_to(secret)
    Image.new("RGB", (8, 8)).save(env.input_dir / "real.png")
    assert env.input_images() == ["real.png"]
    assert "not found in the input folder" in images.LoadImage.VALIDATE_INPUTS("link.png")
    with pytest.raises(NodeInputError, match="not found"):
        images.LoadImage().run("link.png")


def test_unreadable_image_is_a_clear_error(env):
    (env.input_dir / "junk.png").write_bytes(b"not an image")
    assert "cannot read image junk.png" in images.LoadImage.VALIDATE_INPUTS("junk.png")


def test_out_of_memory_is_recognised_by_type_not_text():
    # Issue 11: "out of memory" was a string match, so any RuntimeError mentioning it retried in tiles.
    tiled = []

    def oom(_x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert images._whole_or_tiled(oom, lambda: tiled.append(1) or "tiles", None, large=False) == "tiles"

    def other(_x):
        raise RuntimeError("something else: out of memory in the message")

    with pytest.raises(RuntimeError, match="something else"):
        images._whole_or_tiled(other, lambda: "tiles", None, large=False)
    assert tiled == [1]
