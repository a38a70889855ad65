"""The labeling database: comparisons, who was shown what, and every vote, in one SQLite file (WAL mode).

The database is the one owner of state (the web app keeps nothing in memory): each call opens its own
transaction and commits before it returns, so a vote the page was told about is on disk, and a server
killed with SIGKILL and started again continues every annotator where they were.

Tables:
- comparisons: a prompt (JSON: text or chat messages) and two completions `a` and `b` (untrusted text), a
  unique key (the same comparison added twice is one) and where it came from (`source`, JSON).
- claims: the comparison an annotator is being shown, and which completion is on the left (`a` or `b`,
  drawn at random, recorded). A claim counts toward the comparison's overlap until it expires unanswered.
- votes: one per (comparison, annotator): a, b, tie, both_bad or skip, the side `a` was shown on, an
  optional comment, the time. A vote sent twice is stored once.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from dpokit.errors import UsageError

DB_NAME = "labels.sqlite"
CHOICES = ("a", "b", "tie", "both_bad", "skip")
"""What a vote says: a or b is better, equally good, both bad, or no label (skip)."""
CLAIM_TIMEOUT_S = 30 * 60
"""A comparison shown to an annotator who does not answer counts toward its overlap this long."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS claims (
    comparison INTEGER NOT NULL REFERENCES comparisons(id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    at REAL NOT NULL,
    PRIMARY KEY (comparison, annotator)
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    comparison INTEGER NOT NULL REFERENCES comparisons(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad', 'skip')),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    comment TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL,
    UNIQUE (comparison, annotator)
);
CREATE INDEX IF NOT EXISTS votes_by_annotator ON votes (annotator, id);
"""


class VoteRefused(UsageError):
    """A vote the store cannot take (not shown to this annotator, or already answered otherwise)."""


@dataclass(frozen=True)
class Comparison:
    id: int
    prompt: object
    a: str
    b: str
    source: dict


def comparison_key(prompt, a: str, b: str, source: dict | None = None) -> str:
    """The identity of a comparison: its texts and, for the rounds, its round (the same texts in another
    round are another comparison)."""
    scope = (source or {}).get("round")
    return hashlib.sha256(json.dumps([prompt, a, b, scope], sort_keys=True).encode()).hexdigest()


class Store:
    """The labeling database of a folder (FOLDER/labels.sqlite). Safe to share between threads: each thread
    has its own connection; every method is one transaction."""

    def __init__(self, folder, create: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        if not self.path.exists():
            if not create:
                raise UsageError(
                    f"{self.folder}: holds no labels ({DB_NAME}); start with `dpokit label serve {self.folder} "
                    "--data FILE` (or --model MODEL --prompts FILE)"
                )
            self.folder.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # idempotent; executescript commits on its own

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "PRAGMA synchronous=FULL"
            )  # a vote acknowledged is a vote on disk, power loss included
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def _tx(self):
        return _Transaction(self._db())

    # ---- settings
    def setting(self, key: str, default=None):
        row = self._db().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def overlap(self) -> int:
        """How many annotators label each comparison."""
        return int(self.setting("overlap", 1))

    # ---- comparisons
    def add(self, items: list[tuple[object, str, str, dict]]) -> int:
        """Add (prompt, a, b, source) comparisons; those already here are left as they are. Returns how many
        are new."""
        with self._tx() as db:
            before = db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO comparisons (key, prompt, a, b, source) VALUES (?, ?, ?, ?, ?)",
                [
                    (comparison_key(p, a, b, s), json.dumps(p), a, b, json.dumps(s, sort_keys=True))
                    for p, a, b, s in items
                ],
            )
            return db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0] - before

    def comparisons(self, where_round: int | None = None) -> list[Comparison]:
        rows = self._db().execute("SELECT * FROM comparisons ORDER BY id").fetchall()
        out = [_comparison(r) for r in rows]
        return [c for c in out if where_round is None or c.source.get("round") == where_round]

    def comparison(self, cid: int) -> Comparison | None:
        row = self._db().execute("SELECT * FROM comparisons WHERE id = ?", (cid,)).fetchone()
        return _comparison(row) if row else None

    # ---- what an annotator sees
    def next_for(self, annotator: str) -> tuple[Comparison, str] | None:
        """The comparison `annotator` is shown, with the side `a` is on: the one they were shown and have not
        answered, else the first that has fewer than `overlap` annotators (votes and live claims) and that
        they have not answered; None when none is left for them."""
        with self._tx() as db:
            return self._claim(db, annotator)

    def _claim(self, db, annotator: str) -> tuple[Comparison, str] | None:
        held = db.execute(
            "SELECT c.*, k.left_side FROM claims k JOIN comparisons c ON c.id = k.comparison "
            "WHERE k.annotator = ? ORDER BY k.at LIMIT 1",
            (annotator,),
        ).fetchone()
        if held:
            return _comparison(held), held["left_side"]
        live = time.time() - CLAIM_TIMEOUT_S
        row = db.execute(
            """SELECT c.* FROM comparisons c
               WHERE NOT EXISTS (SELECT 1 FROM votes v WHERE v.comparison = c.id AND v.annotator = :who)
                 AND (SELECT COUNT(*) FROM votes v WHERE v.comparison = c.id)
                   + (SELECT COUNT(*) FROM claims k WHERE k.comparison = c.id AND k.at > :live) < :overlap
               ORDER BY c.id LIMIT 1""",
            {"who": annotator, "live": live, "overlap": self.overlap},
        ).fetchone()
        if row is None:
            return None
        left = random.SystemRandom().choice("ab")
        db.execute("INSERT INTO claims VALUES (?, ?, ?, ?)", (row["id"], annotator, left, time.time()))
        return _comparison(row), left

    def vote(self, annotator: str, cid: int, choice: str, comment: str = "") -> bool:
        """Store `annotator`'s answer to comparison `cid` and release its claim, in one transaction. `choice`:
        one of CHOICES (about the texts a and b), or `left` / `right` (the side as shown: read from the
        claim, or from the stored vote of a resent request). Returns False when this very vote was already
        stored (a resent request); raises VoteRefused when the comparison was not shown to them or was
        answered otherwise."""
        if choice not in CHOICES and choice not in ("left", "right"):
            raise VoteRefused(f"choice {choice!r}: expected one of {', '.join(CHOICES)}, left, right")
        with self._tx() as db:
            done = db.execute(
                "SELECT choice, comment, left_side FROM votes WHERE comparison = ? AND annotator = ?",
                (cid, annotator),
            ).fetchone()
            claim = (
                done
                or db.execute(
                    "SELECT left_side FROM claims WHERE comparison = ? AND annotator = ?", (cid, annotator)
                ).fetchone()
            )
            if claim is None:
                raise VoteRefused(f"comparison {cid} is not the one shown to {annotator!r}")
            left = claim["left_side"]
            choice = {"left": left, "right": "b" if left == "a" else "a"}.get(choice, choice)
            if done is not None:
                if (done["choice"], done["comment"]) == (choice, comment):
                    return False
                raise VoteRefused(f"comparison {cid} was already answered by {annotator!r}: undo it first")
            db.execute(
                "INSERT INTO votes (comparison, annotator, choice, left_side, comment, at) VALUES (?, ?, ?, ?, ?, ?)",
                (cid, annotator, choice, left, comment, time.time()),
            )
            db.execute("DELETE FROM claims WHERE comparison = ? AND annotator = ?", (cid, annotator))
            return True

    def undo(self, annotator: str) -> int | None:
        """Take back `annotator`'s last vote: it is deleted and its comparison shown again, on the same sides.
        Returns its comparison id (None: nothing to undo)."""
        with self._tx() as db:
            last = db.execute(
                "SELECT * FROM votes WHERE annotator = ? ORDER BY id DESC LIMIT 1", (annotator,)
            ).fetchone()
            if last is None:
                return None
            db.execute("DELETE FROM votes WHERE id = ?", (last["id"],))
            db.execute("DELETE FROM claims WHERE annotator = ?", (annotator,))
            db.execute(
                "INSERT INTO claims VALUES (?, ?, ?, ?)",
                (last["comparison"], annotator, last["left_side"], time.time()),
            )
            return last["comparison"]

    # ---- reading the votes
    def votes(self) -> list[dict]:
        rows = self._db().execute("SELECT * FROM votes ORDER BY id").fetchall()
        return [dict(r) for r in rows]

    def done_by(self, annotator: str) -> int:
        return (
            self._db().execute("SELECT COUNT(*) FROM votes WHERE annotator = ?", (annotator,)).fetchone()[0]
        )

    def open_count(self, where_round: int | None = None) -> int:
        """Comparisons that still need an annotator (fewer than `overlap` votes)."""
        counts = dict(
            self._db().execute("SELECT comparison, COUNT(*) FROM votes GROUP BY comparison").fetchall()
        )
        return sum(counts.get(c.id, 0) < self.overlap for c in self.comparisons(where_round))

    def left_for(self, annotator: str) -> int:
        """Comparisons this annotator may still be shown (not answered by them, short of overlap)."""
        row = (
            self._db()
            .execute(
                """SELECT COUNT(*) FROM comparisons c
               WHERE NOT EXISTS (SELECT 1 FROM votes v WHERE v.comparison = c.id AND v.annotator = ?)
                 AND (SELECT COUNT(*) FROM votes v WHERE v.comparison = c.id) < ?""",
                (annotator, self.overlap),
            )
            .fetchone()
        )
        return row[0]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): writers take the lock at once, so two annotators
    cannot claim past a comparison's overlap between a read and a write."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _comparison(row) -> Comparison:
    return Comparison(row["id"], json.loads(row["prompt"]), row["a"], row["b"], json.loads(row["source"]))


def pairs_of(prompt, completions: list[str], source: dict | None = None) -> tuple[list, int]:
    """Every pair of a prompt's distinct completions as (prompt, a, b, source) comparisons, source naming the
    completions' positions (i, j); and how many pairs were identical texts (left out)."""
    items, identical = [], 0
    for i, j in combinations(range(len(completions)), 2):
        if completions[i] == completions[j]:
            identical += 1
            continue
        items.append((prompt, completions[i], completions[j], {**(source or {}), "i": i, "j": j}))
    return items, identical
