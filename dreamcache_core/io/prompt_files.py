"""Prompt files of the command-line tools (generate --prompts-file, train --validation-prompts)."""
from __future__ import annotations


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line; lines starting with # are comments).")
    return prompts
