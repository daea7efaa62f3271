"""Which ids are local, answered without a scan or a thread hop while the models folder has not
changed (a routed request asks it on its way to the first token), and routing by that answer."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from appliance.config import UpstreamSettings
from appliance.metrics import Metrics
from appliance.registry import RACY_NS, Registry
from appliance.upstream import UpstreamPool


def _age(folder: Path) -> None:
    """Date the folder's mtime back past the racy window, as any folder left alone a while."""
    old = os.stat(folder).st_mtime_ns - 2 * RACY_NS
    os.utime(folder, ns=(old, old))


def test_local_now_trusts_the_last_scan_only_while_the_folder_is_unchanged(
        tmp_path: Path, tiny_gguf: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "Here-Q4_K_M.gguf")
    (folder / "broken.gguf").write_bytes(b"GGUF but not really")  # unusable, still local
    registry = Registry(folder, aliases={"nick": "here-q4_k_m", "dangling": "gone"})
    assert registry.local_now("here-q4_k_m") is None  # never scanned
    registry.scan()
    assert registry.local_now("here-q4_k_m") is None  # changed just before the scan

    _age(folder)
    registry.scan()
    assert registry.local_now("here-q4_k_m") is True
    assert registry.local_now("HERE-Q4_K_M") is True  # ids and aliases ignore case
    assert registry.local_now("Nick") is True
    assert registry.local_now("broken") is True
    assert registry.local_now("dangling") is False  # an alias of a model that is not here
    assert registry.local_now("elsewhere") is False

    shutil.copy(tiny_gguf, folder / "new-q4_k_m.gguf")  # dropped in after the scan
    assert registry.local_now("new-q4_k_m") is None
    assert registry.local_now("here-q4_k_m") is None
    _age(folder)
    registry.scan()
    assert registry.local_now("new-q4_k_m") is True

    (folder / "Here-Q4_K_M.gguf").unlink()
    assert registry.local_now("here-q4_k_m") is None
    _age(folder)
    registry.scan()
    assert registry.local_now("here-q4_k_m") is False
    assert registry.local_now("nick") is False


def test_local_now_without_a_folder_is_no_local_model(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "absent")
    registry.scan()
    assert registry.local_now("anything") is False
    (tmp_path / "absent").mkdir()  # created later: only a scan can tell again
    assert registry.local_now("anything") is None


def test_route_asks_the_blocking_check_only_when_the_quick_one_cannot_tell() -> None:
    asked: list[str] = []
    quick: dict[str, bool | None] = {"shared": True, "remote": False, "unsure": None}

    def is_local(name: str) -> bool:
        asked.append(name)
        return name == "unsure"

    settings = UpstreamSettings(url="http://127.0.0.1:9/v1",
                                models=["shared", "remote", "unsure"])

    async def routes() -> dict[str, str | None]:
        pool = UpstreamPool({"team": settings}, {}, Metrics(), is_local=is_local,
                            local_now=quick.__getitem__)
        try:
            found = {}
            for name in ["shared", "remote", "unsure"]:
                upstream = await pool.route(name)
                found[name] = upstream.name if upstream else None
            return found
        finally:
            await pool.close()

    assert asyncio.run(routes()) == {"shared": None, "remote": "team", "unsure": None}
    assert asked == ["unsure"]
