"""`evaluate.py serve`: a local web page for rating images blind, one at a time, from the keyboard.

    python evaluate.py serve --db ratings.sqlite                        # http://127.0.0.1:7861/
    python evaluate.py serve --db ratings.sqlite --host 0.0.0.0 --token "$SECRET"   # raters on the network

The stack is the standard library's ThreadingHTTPServer, a small JSON API and one static page
(`rating_page.html` beside this file): no new dependency, nothing to audit but these two files, and it
runs wherever the toolkit runs. What it guarantees:

- Blind. Images from every run are shuffled together, in an order fixed per rater (each image's place is
  the sha256 of the rater's name and the image's content hash, so adding images later slots them in
  without reshuffling what was there). An image is addressed by its content hash (`/image/<sha256>`), never
  by its file name or database id (ids follow import order, hence the run). The page shows no run, prompt,
  LoRA or seed; the per-run progress panel shows each run's share in steps of 10 % (exact counts, opened
  after each image, would tell the run of the image just rated); the session's report, which the rater
  asks for at the end, reveals everything.
- Nothing is lost. Each rating, skip and undo is one SQLite transaction in WAL mode, committed before the
  page moves on: closing the browser or killing the server loses at most the key being pressed. Any number
  of raters can rate at once; every rating of an image is kept. A rater's next image is the first in their
  order that they have neither rated nor skipped; undo removes their latest rating or skip.
- Safe by default. It binds to 127.0.0.1, checks the Host header there (a web page elsewhere cannot reach
  it through DNS rebinding) and accepts only JSON posts (which other sites cannot send without the
  browser asking first). Any other host needs `--token`, a shared secret the page asks for and sends as a
  cookie. It serves only images registered in the database (anything else is 404), and a score outside
  0, ½, 1 and "no hand" is refused with 400.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from library.errors import ConfigError

log = logging.getLogger("pentadactyl")

PAGE = Path(__file__).with_name("rating_page.html")
TOKEN_COOKIE = "pentadactyl_token"
RESERVED_RATERS = ("counter",)  # automatic judges' names: a person cannot rate as one
MAX_RATER_LENGTH = 64
MAX_BODY = 16 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SCORE_VALUES = {"0": (0.0, False), "0.5": (0.5, False), "1": (1.0, False), "n": (None, True),
                "no-hand": (None, True)}
_SHA256 = frozenset("0123456789abcdef")


class BadRequest(Exception):
    """Maps to an HTTP status with a message the page shows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_score(value) -> tuple[float | None, bool]:
    """0, 0.5, 1 (numbers or strings) → (score, False); "n" / "no-hand" → (None, True); else BadRequest 400."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(400, f"score {value!r}: give 0, 0.5, 1 or \"n\" (no hand)")
    key = value if isinstance(value, str) else f"{float(value):g}"
    if key not in SCORE_VALUES:
        raise BadRequest(400, f"score {value!r}: give 0, 0.5, 1 or \"n\" (no hand)")
    return SCORE_VALUES[key]


def check_rater(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(400, "give your rater name")
    name = name.strip()
    if len(name) > MAX_RATER_LENGTH:
        raise BadRequest(400, f"a rater name has at most {MAX_RATER_LENGTH} characters")
    if name.lower() in RESERVED_RATERS:
        raise BadRequest(400, f"'{name}' is the name of an automatic judge; choose another rater name")
    return name


def place_in_order(rater: str, sha256: str) -> str:
    """The sort key of an image in a rater's shuffled order (a fixed "seed" per rater)."""
    return hashlib.sha256(f"{rater}\0{sha256}".encode()).hexdigest()


class RatingStore:
    """The rating logic over one database connection (one lock: SQLite writes one at a time anyway)."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self._orders: dict[str, tuple[int, list[tuple[int, str]]]] = {}
        self._last_write = 0.0

    # ---- reading

    def order(self, rater: str) -> list[tuple[int, str]]:
        """[(image id, sha256)] in the rater's shuffled order (cached until the image count changes)."""
        count = self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        cached = self._orders.get(rater)
        if cached is None or cached[0] != count:
            images = [(row["id"], row["sha256"]) for row in self.conn.execute("SELECT id, sha256 FROM images")]
            images.sort(key=lambda item: place_in_order(rater, item[1]))
            cached = self._orders[rater] = (count, images)
        return cached[1]

    def _done(self, rater: str) -> tuple[set[int], set[int]]:
        rated = {r[0] for r in self.conn.execute("SELECT image_id FROM ratings WHERE rater = ?", (rater,))}
        skipped = {r[0] for r in self.conn.execute("SELECT image_id FROM skips WHERE rater = ?", (rater,))}
        return rated, skipped

    def state(self, rater: str, note: str = "") -> dict:
        """What the page shows: the next image (an opaque URL) and the rater's overall progress."""
        with self.lock:
            order = self.order(rater)
            rated, skipped = self._done(rater)
            upcoming = next((sha for image_id, sha in order if image_id not in rated and image_id not in skipped),
                            None)
            in_order = {image_id for image_id, _ in order}
            return {"rater": rater, "image": upcoming and f"/image/{upcoming}", "total": len(order),
                    "rated": len(rated & in_order), "skipped": len(skipped & in_order),
                    "can_undo": bool(rated or skipped), "note": note}

    def progress(self, rater: str) -> dict:
        """Per run: images and the share this rater has rated, in 10 % steps (see the module docstring)."""
        with self.lock:
            rated, _ = self._done(rater)
            totals, done = Counter(), Counter()
            for row in self.conn.execute("SELECT id, run FROM images"):
                totals[row["run"]] += 1
                done[row["run"]] += row["id"] in rated
            runs = [{"run": run, "images": n, "rated_tenths": 10 * done[run] // n} for run, n in sorted(totals.items())]
            return {"runs": runs, "raters": self.conn.execute(
                "SELECT COUNT(DISTINCT rater) FROM ratings WHERE source = 'human'").fetchone()[0]}

    def report(self, rater: str) -> dict:
        """The end of blindness for this rater: their ratings per run, and the latest ones in full."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT r.score, r.no_hand, r.rated_at, i.run, i.prompt, i.seed, i.loras, i.training_step "
                "FROM ratings r JOIN images i ON i.id = r.image_id WHERE r.rater = ? ORDER BY r.rated_at DESC, "
                "r.id DESC", (rater,)).fetchall()
            totals = Counter(row["run"] for row in self.conn.execute("SELECT run FROM images"))
        runs = {}
        for row in rows:
            entry = runs.setdefault(row["run"], {"run": row["run"], "images": totals[row["run"]], "rated": 0,
                                                 "0": 0, "0.5": 0, "1": 0, "no hand": 0, "mean": None, "_sum": 0.0})
            entry["rated"] += 1
            if row["no_hand"]:
                entry["no hand"] += 1
            else:
                entry[f"{row['score']:g}"] += 1
                entry["_sum"] += row["score"]
        for entry in runs.values():
            scored = entry["rated"] - entry["no hand"]
            entry["mean"] = round(entry.pop("_sum") / scored, 4) if scored else None
        latest = [{"run": row["run"], "prompt": row["prompt"], "seed": row["seed"],
                   "loras": json.loads(row["loras"]) if row["loras"] else [], "training_step": row["training_step"],
                   "score": "no hand" if row["no_hand"] else f"{row['score']:g}"} for row in rows[:100]]
        return {"rater": rater, "runs": sorted(runs.values(), key=lambda e: e["run"]), "latest": latest,
                "ratings": len(rows)}

    def image_path(self, sha256: str) -> Path | None:
        if len(sha256) != 64 or not set(sha256) <= _SHA256:
            return None
        with self.lock:
            row = self.conn.execute("SELECT path FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return Path(row["path"]) if row is not None else None

    # ---- writing (each call one committed transaction)

    def _image_id(self, image_url) -> int:
        sha = image_url.rsplit("/", 1)[-1] if isinstance(image_url, str) else ""
        row = self.conn.execute("SELECT id FROM images WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            raise BadRequest(404, "no such image in the database")
        return row["id"]

    def _pace(self) -> None:
        # rated_at has millisecond resolution and undo takes the latest action: keep them apart in time
        wait = self._last_write + 0.002 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_write = time.monotonic()

    def rate(self, rater: str, image_url, value) -> tuple[str, bool]:
        score, no_hand = parse_score(value)
        with self.lock:
            image_id = self._image_id(image_url)
            if self.conn.execute("SELECT 1 FROM ratings WHERE rater = ? AND image_id = ?",
                                 (rater, image_id)).fetchone():
                return "you rated that image already (another tab?); here is your next one", False
            self._pace()
            self.conn.execute("INSERT INTO ratings (image_id, rater, score, no_hand, source) "
                              "VALUES (?, ?, ?, ?, 'human')", (image_id, rater, score, int(no_hand)))
        return f"saved: {'no hand' if no_hand else f'{score:g}'}", True

    def skip(self, rater: str, image_url) -> tuple[str, bool]:
        with self.lock:
            image_id = self._image_id(image_url)
            self._pace()
            self.conn.execute("INSERT INTO skips (image_id, rater) VALUES (?, ?)", (image_id, rater))
        return "skipped", True

    def undo(self, rater: str) -> tuple[str, bool]:
        with self.lock:
            rating = self.conn.execute("SELECT id, rated_at FROM ratings WHERE rater = ? ORDER BY rated_at DESC, "
                                       "id DESC LIMIT 1", (rater,)).fetchone()
            skipped = self.conn.execute("SELECT id, skipped_at FROM skips WHERE rater = ? ORDER BY skipped_at DESC, "
                                        "id DESC LIMIT 1", (rater,)).fetchone()
            if rating is None and skipped is None:
                return "nothing to undo", False
            self._pace()
            if skipped is None or (rating is not None and rating["rated_at"] > skipped["skipped_at"]):
                self.conn.execute("DELETE FROM ratings WHERE id = ?", (rating["id"],))
                return "undone: your last rating", True
            self.conn.execute("DELETE FROM skips WHERE id = ?", (skipped["id"],))
            return "undone: your last skip", True


# --------------------------------------------------------------------------------------------- HTTP


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_handler(store: RatingStore, token: str | None, check_host: bool):
    from http import cookies
    from http.server import BaseHTTPRequestHandler

    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "pentadactyl-rating"
        sys_version = ""

        def log_message(self, format, *args):  # the default logs every request; we log actions and errors
            pass

        # ---- plumbing

        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", {"Cache-Control": "no-store"})

        def _error(self, status: int, message: str) -> None:
            if status >= 500 or status in (401, 403):
                log.warning(f"{self.command} {urlsplit(self.path).path}: {status} {message}")
            self._json(status, {"error": message})

        def _host_ok(self) -> bool:
            if check_host:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
                if host not in LOOPBACK_NAMES:
                    self._error(403, f"Host {host!r} is not this computer; open the address the server printed")
                    return False
            return True

        def _authorised(self) -> bool:
            if not self._host_ok():
                return False
            if token is None:
                return True
            jar = cookies.SimpleCookie()
            try:
                jar.load(self.headers.get("Cookie") or "")
            except cookies.CookieError:
                pass
            given = unquote(jar[TOKEN_COOKIE].value) if TOKEN_COOKIE in jar else (self.headers.get("X-Token") or "")
            if hmac.compare_digest(given.encode(), token.encode()):
                return True
            self._error(401, "this server needs its token: ask whoever started it")
            return False

        def _body(self) -> dict:
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                raise BadRequest(415, "send JSON (Content-Type: application/json)")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise BadRequest(413, "request too large")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                raise BadRequest(400, "the request is not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest(400, "send a JSON object")
            return body

        # ---- routes

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path in ("/", "/index.html"):
                    if not self._host_ok():  # the page holds no data: it asks for the token itself
                        return
                    self._send(200, page, "text/html; charset=utf-8", {"Cache-Control": "no-store"})
                    return
                if not self._authorised():
                    return
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/api/state":
                    self._json(200, store.state(check_rater(query.get("rater"))))
                elif url.path == "/api/progress":
                    self._json(200, store.progress(check_rater(query.get("rater"))))
                elif url.path == "/api/report":
                    self._json(200, store.report(check_rater(query.get("rater"))))
                elif url.path.startswith("/image/"):
                    self._image(url.path[len("/image/"):])
                else:
                    self._error(404, "not found")
            except BadRequest as exc:
                self._error(exc.status, str(exc))

        do_HEAD = do_GET

        def _image(self, sha: str) -> None:
            path = store.image_path(sha)
            if path is None:
                self._error(404, "no such image")
                return
            try:
                data = path.read_bytes()
            except OSError:
                log.warning(f"image file {path} is gone; re-import its folder (`evaluate.py import`)")
                self._error(404, "the image file is gone from disk")
                return
            self._send(200, data, "image/png", {"Cache-Control": "private, max-age=86400"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            try:
                if not self._authorised():
                    return
                actions = {"/api/rate": lambda b, r: store.rate(r, b.get("image"), b.get("score")),
                           "/api/skip": lambda b, r: store.skip(r, b.get("image")),
                           "/api/undo": lambda b, r: store.undo(r)}
                if url.path not in actions:
                    raise BadRequest(404, "not found")
                body = self._body()
                rater = check_rater(body.get("rater"))
                note, changed = actions[url.path](body, rater)
                state = store.state(rater, note)
                if changed:
                    log.info(f"{rater}: {note} ({state['rated']} rated, {state['skipped']} skipped, "
                             f"{state['total']} images)")
                self._json(200, state)
            except BadRequest as exc:
                self._error(exc.status, str(exc))

    return Handler


def make_server(db: str, host: str = "127.0.0.1", port: int = 7861, token: str | None = None):
    """The (not yet serving) HTTP server; refuses a non-loopback host without a token."""
    from http.server import ThreadingHTTPServer

    from library.evaluate.db import connect

    loopback = is_loopback(host)
    if not loopback and not token:
        raise ConfigError(f"--host {host}: other computers could reach the page and write ratings; give "
                          "--token SECRET (raters type it into the page), or keep the default --host 127.0.0.1")
    if token is not None and len(token) < 8:
        raise ConfigError("--token: use at least 8 characters (a guessable token protects nothing)")
    conn = connect(db, create=False)
    store = RatingStore(conn)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(store, token, check_host=loopback))
    except OSError as exc:
        conn.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another "
                          "--port (0 picks a free one)") from None
    server.daemon_threads = True
    server.store = store
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the rating database (SQLite), made by `evaluate.py import`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only; others need --token)")
    parser.add_argument("--port", type=int, default=7861, help="port (default 7861; 0: any free port)")
    parser.add_argument("--token", default=None,
                        help="a shared secret the page asks for; required for any --host but loopback")


def run(args: argparse.Namespace) -> int:
    server = make_server(args.db, args.host, args.port, args.token)
    host, port = server.server_address[:2]
    images = server.store.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    if images == 0:
        log.warning(f"{args.db} holds no images yet: `evaluate.py import --db {args.db} FOLDER`, then reload the page")
    print(f"rating {images} image(s) from {args.db}; open http://{shown}:{port}/ in a browser "
          f"(Ctrl-C stops; every rating is saved at once)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.store.conn.close()
    print("stopped; all ratings are in the database", flush=True)
    return 0


COMMANDS = {"serve": ("a local web page to rate images blind, from the keyboard (0 / 5 / 1 / n, s, u)",
                      add_arguments, run)}
