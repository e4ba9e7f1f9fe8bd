"""The edge model's mapped file pages: clean ones under the model folder are dropped, nothing else."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from client.residency import SMAPS, mappings, release_model_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")

SIZE = 4 << 20


def _mapped(path: Path) -> tuple[mmap.mmap, bytes]:
    data = bytes(range(256)) * (SIZE // 256)
    path.write_bytes(data)
    with path.open("rb") as f:
        view = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    sum(view[i] for i in range(0, SIZE, mmap.PAGESIZE))  # read every page: resident, clean
    return view, data


def _resident_kib(path: Path) -> int:
    return sum(m.rss_kib for m in mappings(SMAPS.read_text()) if m.path == str(path.resolve()))


def test_clean_pages_of_the_model_folder_are_released_and_read_back_unchanged(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    view, data = _mapped(folder / "model.onnx.data")
    assert _resident_kib(folder / "model.onnx.data") >= SIZE // 1024

    released = release_model_pages(folder)

    assert released >= SIZE // 1024
    assert _resident_kib(folder / "model.onnx.data") == 0
    assert view[:] == data  # mapped again from the file, the same bytes
    view.close()


def test_a_written_mapping_and_files_outside_the_folder_are_left_alone(tmp_path):
    folder, elsewhere = tmp_path / "model", tmp_path / "adapters"
    folder.mkdir()
    elsewhere.mkdir()
    written, _ = _mapped(folder / "written.data")
    written[5] = 99  # a private copy of one page: this mapping now holds data the file does not
    other, _ = _mapped(elsewhere / "adapter.onnx_adapter")
    before = _resident_kib(elsewhere / "adapter.onnx_adapter")

    assert release_model_pages(folder) == 0

    assert written[5] == 99
    assert _resident_kib(folder / "written.data") > 0
    assert _resident_kib(elsewhere / "adapter.onnx_adapter") == before
    written.close()
    other.close()


def test_smaps_lines_it_does_not_know_are_skipped():
    text = (
        "7f00000000-7f00001000 r--p 00000000 fe:00 12 /m/model.onnx.data\n"
        "Rss:                   4 kB\n"
        "Anonymous:             0 kB\n"
        "VmFlags: rd mr mw me\n"
        "garbage line\n"
        "7f00002000-7f00003000 rw-p 00000000 00:00 0\n"
        "Rss:                 nan kB\n"
    )
    first, second = mappings(text)
    assert (first.path, first.rss_kib, first.anonymous_kib) == ("/m/model.onnx.data", 4, 0)
    assert (second.path, second.rss_kib, second.anonymous_kib) == ("", -1, -1)
