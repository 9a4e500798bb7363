"""A fake installed distribution for tests: a *.dist-info (METADATA + RECORD) and its files in a
folder that the test puts first on sys.path, so importlib.metadata finds it."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


def install_fake_distribution(site: Path, name: str, files: Mapping[str, str | bytes],
                              version: str = "0.0.1") -> Path:
    """Writes `files` ({relative path: content}) under `site` and a dist-info whose RECORD lists
    them. Returns `site` (prepend it to sys.path)."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, content in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return site
