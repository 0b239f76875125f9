"""The registry: ids, lookups that never touch the filesystem, broken and hidden files."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import anyio
import pytest

from modeld.devtools.tiny_gguf import write_tiny_llama
from modeld.errors import ModelNotFound
from modeld.registry import ModelSpec, Registry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny.gguf")


@pytest.mark.anyio
async def test_ids_are_file_names_and_the_suffix_is_optional(tmp_path: Path, tiny: Path) -> None:
    shutil.copy(tiny, tmp_path / "a.gguf")
    (tmp_path / "notes.txt").write_text("not a model")
    reg = Registry(tmp_path)
    assert list(reg.scan()) == ["a.gguf"]
    spec = await reg.resolve("a")
    assert spec.id == "a.gguf" and spec.path == tmp_path / "a.gguf"
    assert spec.size_bytes == tiny.stat().st_size and spec.invalid is None
    assert await reg.resolve("a.gguf") is spec


@pytest.mark.parametrize(
    "name",
    ["", "../a.gguf", "/etc/passwd", "a.gguf\0", "..", "./a.gguf", "%2e%2e%2fa.gguf", "A.GGUF"],
)
@pytest.mark.anyio
async def test_tricky_ids_are_not_found(tmp_path: Path, tiny: Path, name: str) -> None:
    shutil.copy(tiny, tmp_path / "a.gguf")
    reg = Registry(tmp_path)
    reg.scan()
    with pytest.raises(ModelNotFound):
        await reg.resolve(name)


@pytest.mark.anyio
async def test_a_new_file_is_found_on_a_miss_and_a_removed_one_is_gone(
    tmp_path: Path, tiny: Path
) -> None:
    reg = Registry(tmp_path)
    reg.scan()
    shutil.copy(tiny, tmp_path / "new.gguf")
    assert (await reg.resolve("new")).id == "new.gguf"
    os.unlink(tmp_path / "new.gguf")
    assert reg.scan() == {}


def test_broken_files_are_listed_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "dir.gguf").mkdir()
    os.mkfifo(tmp_path / "fifo.gguf")
    specs = Registry(tmp_path).scan()  # must not block on the FIFO
    assert specs["junk.gguf"].invalid
    assert specs["dir.gguf"].invalid == "not a regular file"
    assert specs["fifo.gguf"].invalid == "not a regular file"
    assert str(tmp_path) not in (specs["junk.gguf"].invalid or "")


def test_split_models_appear_once_with_the_total_size(tmp_path: Path, tiny: Path) -> None:
    shutil.copy(tiny, tmp_path / "big-00001-of-00002.gguf")
    shutil.copy(tiny, tmp_path / "big-00002-of-00002.gguf")
    specs = Registry(tmp_path).scan()
    assert list(specs) == ["big-00001-of-00002.gguf"]
    assert specs["big-00001-of-00002.gguf"].size_bytes == 2 * tiny.stat().st_size


def test_symlinks_outside_the_dir_need_follow_symlinks(tmp_path: Path, tiny: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny, models / "inside.gguf")
    (models / "in-link.gguf").symlink_to(models / "inside.gguf")
    (models / "out-link.gguf").symlink_to(tiny)
    (models / "dangling.gguf").symlink_to(models / "gone.gguf")
    specs = Registry(models).scan()
    valid = sorted(i for i, s in specs.items() if s.invalid is None)
    assert valid == ["in-link.gguf", "inside.gguf"]
    out = specs["out-link.gguf"]  # listed, never served, and the reason says what to do
    assert out.invalid and "--follow-symlinks" in out.invalid and out.size_bytes == 0
    assert specs["dangling.gguf"].invalid == "symlink to a missing file"
    specs = Registry(models, follow_symlinks=True).scan()
    assert sorted(i for i, s in specs.items() if s.invalid is None) == [
        "in-link.gguf",
        "inside.gguf",
        "out-link.gguf",
    ]


@pytest.mark.anyio
async def test_refresh_scans_off_the_event_loop_and_callers_share_scans(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(tiny, tmp_path / "a.gguf")
    reg = Registry(tmp_path)
    threads: list[int] = []
    release = threading.Event()
    real_scan = reg.scan

    def slow_scan() -> dict[str, ModelSpec]:
        threads.append(threading.get_ident())
        release.wait(10)
        return real_scan()

    monkeypatch.setattr(reg, "scan", slow_scan)
    results: list[list[str]] = []

    async def refresh() -> None:
        results.append(sorted(await reg.refresh()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(refresh)  # the first scan starts and blocks in its thread
        await anyio.sleep(0.05)
        for _ in range(5):  # arrive during it: they must wait for one scan after it
            tg.start_soon(refresh)
        await anyio.sleep(0.05)
        assert len(threads) == 1  # the loop still runs while the scan blocks
        release.set()
    assert results == [["a.gguf"]] * 6
    assert len(threads) == 2  # one scan under way, then one shared by the five
    assert threading.get_ident() not in threads


@pytest.mark.anyio
async def test_a_file_seen_half_written_is_looked_at_again_on_request(
    tmp_path: Path, tiny: Path
) -> None:
    (tmp_path / "m.gguf").write_bytes(tiny.read_bytes()[:100])  # a copy still under way
    reg = Registry(tmp_path)
    assert reg.scan()["m.gguf"].invalid
    shutil.copy(tiny, tmp_path / "m.gguf")  # the copy completes
    spec = await reg.resolve("m")
    assert spec.invalid is None


@pytest.mark.anyio
async def test_a_file_rewritten_in_place_is_checked_again_before_it_is_served(
    tmp_path: Path, tiny: Path
) -> None:
    path = tmp_path / "m.gguf"
    shutil.copy(tiny, path)
    reg = Registry(tmp_path)
    assert reg.scan()["m.gguf"].invalid is None
    inode = path.stat().st_ino
    with path.open("r+b") as f:  # the same file (inode), now broken
        f.truncate(100)
    assert path.stat().st_ino == inode
    spec = await reg.resolve("m")
    assert spec.invalid and "truncated" in spec.invalid  # not the stale, valid spec


@pytest.mark.anyio
async def test_a_split_model_is_looked_at_again_when_any_part_changes(
    tmp_path: Path, tiny: Path
) -> None:
    first, second = tmp_path / "big-00001-of-00002.gguf", tmp_path / "big-00002-of-00002.gguf"
    shutil.copy(tiny, first)
    reg = Registry(tmp_path)
    assert reg.scan()[first.name].invalid == "split model with missing parts"
    shutil.copy(tiny, second)  # the download of the last part completes
    assert reg.scan()[first.name].size_bytes == 2 * tiny.stat().st_size
    spec = await reg.resolve(first.name)
    assert spec.invalid != "split model with missing parts"
    with second.open("r+b") as f:  # a later part changes: the next request looks again
        f.truncate(100)
    assert (await reg.resolve(first.name)).size_bytes == tiny.stat().st_size + 100
