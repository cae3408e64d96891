"""The rating database: one SQLite file holding the images, every rating, metrics and predictions.

    images       one row per distinct PNG (content sha256), its path and what its A1111 parameters say
    ratings      every rating ever given: (image, rater, score) — several raters keep several rows
    metrics      per-image metric values (CLIP score, hand landmarks, …), one row per (image, metric)
    set_metrics  per-run metric values computed over a set of images (KID, FID against a reference)
    predictions  a trained classifier's predicted score per image, one row per (image, model)
    skips        images a rater passed over on the rating page (so the next image is another, and undo
                 can take the skip back); not a rating: nothing else reads them

A score is 0, 0.5 or 1 (the study's three-point scale); "no hand in the image" is stored as
`score = NULL, no_hand = 1`. The file is opened in WAL mode, so a rating committed by one connection is
on disk at once and readers in other processes (a second rater, the report) never block it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

SCORES = (0.0, 0.5, 1.0)  # the three-point scale; "no hand" is kept apart (score NULL, no_hand 1)

SCHEMA_VERSION = 2  # 2: the skips table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id              INTEGER PRIMARY KEY,
    sha256          TEXT NOT NULL UNIQUE,
    path            TEXT NOT NULL,
    run             TEXT NOT NULL,
    prompt          TEXT,
    negative_prompt TEXT,
    seed            INTEGER,
    sampler         TEXT,
    steps           INTEGER,
    cfg_scale       REAL,
    width           INTEGER,
    height          INTEGER,
    model_hash      TEXT,
    loras           TEXT,      -- JSON list of [name, multiplier]; NULL when none
    training_step   INTEGER,
    parameters      TEXT,      -- the raw A1111 text, NULL when the PNG has none
    imported_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS images_run ON images(run);
CREATE TABLE IF NOT EXISTS ratings (
    id        INTEGER PRIMARY KEY,
    image_id  INTEGER NOT NULL REFERENCES images(id),
    rater     TEXT NOT NULL,
    score     REAL CHECK (score IS NULL OR score IN (0, 0.5, 1)),
    no_hand   INTEGER NOT NULL DEFAULT 0 CHECK (no_hand IN (0, 1)),
    source    TEXT NOT NULL DEFAULT 'human',   -- 'human', or the automatic judge that filled it ('counter')
    rated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK ((no_hand = 1 AND score IS NULL) OR (no_hand = 0 AND score IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS ratings_image ON ratings(image_id);
CREATE INDEX IF NOT EXISTS ratings_rater ON ratings(rater);
CREATE TABLE IF NOT EXISTS metrics (
    image_id    INTEGER NOT NULL REFERENCES images(id),
    name        TEXT NOT NULL,
    value       REAL,
    computed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (image_id, name)
);
CREATE TABLE IF NOT EXISTS set_metrics (
    run         TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       REAL,
    std         REAL,
    images      INTEGER NOT NULL,
    reference   TEXT,
    computed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run, name)
);
CREATE TABLE IF NOT EXISTS predictions (
    image_id    INTEGER NOT NULL REFERENCES images(id),
    model       TEXT NOT NULL,
    score       REAL NOT NULL,
    computed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (image_id, model)
);
CREATE TABLE IF NOT EXISTS skips (
    id          INTEGER PRIMARY KEY,
    image_id    INTEGER NOT NULL REFERENCES images(id),
    rater       TEXT NOT NULL,
    skipped_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS skips_rater ON skips(rater);
"""


class DatabaseError(Exception):
    """The database file cannot be used: a clear message naming it and what to do."""


def connect(path: str | os.PathLike, create: bool = True) -> sqlite3.Connection:
    """Open (and, when `create`, make) the rating database in WAL mode with foreign keys on.

    Rows come back as `sqlite3.Row`. `create=False` refuses a file that does not exist, for the
    commands that only read (report, export): a typo in --db then says so instead of making a new, empty file.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise DatabaseError(f"--db {path}: no such rating database; make one with "
                            f"`python evaluate.py import --db {path} FOLDER`")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed rating survives a killed process
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"--db {path}: made by a newer pentadactyl (schema {version}, this one "
                                f"knows {SCHEMA_VERSION}); update pentadactyl")
        conn.executescript(_SCHEMA)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"--db {path}: not a usable SQLite rating database ({exc})") from None
    return conn
