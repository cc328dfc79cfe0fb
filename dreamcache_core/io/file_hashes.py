"""What a file is, recorded: its SHA-256 and size (generation's settings.json, synthesis's captions record)."""
from __future__ import annotations

import hashlib
import os
from typing import Optional


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
