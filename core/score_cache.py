"""A persistent cache of oracle scores, so no image-attribute pair is ever paid for twice.

Keyed by the oracle's ``cache_key`` (oracle, model, prompt version), the image's content hash
and the attribute name. Only valid scores are stored: a missing score is asked again on the
next run. Every answer is committed as soon as it arrives, so a run killed part-way keeps
everything it had finished.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def image_hash(image: np.ndarray) -> str:
    """Content hash of one uint8 image (shape and pixels)."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha1(str(image.shape).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ScoreCache:
    """SQLite table ``scores(oracle, image, attribute) -> score``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit survives a killed process without an fsync per answer (WAL keeps it atomic).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (oracle TEXT NOT NULL, image TEXT NOT NULL, "
                         "attribute TEXT NOT NULL, score REAL NOT NULL, PRIMARY KEY (oracle, image, attribute))")
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (oracle TEXT NOT NULL, batch TEXT NOT NULL, "
                         "requests TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (oracle, batch))")
        self._db.commit()

    def get(self, oracle: str, hashes: Sequence[str], attributes: Sequence[str]) -> np.ndarray:
        """Cached scores (len(hashes), len(attributes)); NaN where nothing is cached."""
        found: dict[tuple[str, str], float] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            query = (f"SELECT image, attribute, score FROM scores WHERE oracle = ? "
                     f"AND image IN ({','.join('?' * len(chunk))})")
            for image, attribute, score in self._db.execute(query, [oracle, *chunk]):
                found[image, attribute] = score
        return np.array([[found.get((h, a), np.nan) for a in attributes] for h in hashes], dtype=float)

    def put(self, oracle: str, hashes: Sequence[str], attributes: Sequence[str], scores: np.ndarray) -> int:
        """Store the valid (non-NaN) scores and commit; returns how many were stored."""
        rows = [(oracle, h, a, float(scores[i, j]))
                for i, h in enumerate(hashes) for j, a in enumerate(attributes) if not np.isnan(scores[i, j])]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def add_batch(self, oracle: str, batch: str, requests: Sequence[str]) -> None:
        """Record a submitted batch job and the ids of its requests, so a killed run polls it again
        instead of paying for it twice."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)",
                             (oracle, batch, json.dumps(list(requests)), time.time()))

    def open_batches(self, oracle: str) -> list[tuple[str, list[str]]]:
        """(batch id, request ids) of the oracle's batches not yet collected, oldest first."""
        rows = self._db.execute("SELECT batch, requests FROM batches WHERE oracle = ? ORDER BY created", (oracle,))
        return [(batch, json.loads(requests)) for batch, requests in rows]

    def close_batch(self, oracle: str, batch: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM batches WHERE oracle = ? AND batch = ?", (oracle, batch))

    def count(self, oracle: str | None = None) -> int:
        if oracle is None:
            return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM scores WHERE oracle = ?", (oracle,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ScoreCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
