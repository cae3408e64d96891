"""evaluate.py serve: the rating logic, the HTTP surface of a real server process, and the page in a real
headless Chromium (driven by selenium; skipped only where Chromium or its driver is not installed)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from library.evaluate.db import connect
from library.evaluate.server import BadRequest, RatingStore, parse_score
from library.sampling.infotext import a1111_parameters, save_png_atomic
from support import Server, browser, open_as, press, sign_in, wait_ready

REPO = Path(__file__).resolve().parent.parent
RUNS = ("run-alpha", "run-beta")


def write_images(folder: Path, per_run: int = 6) -> Path:
    """PNGs of two runs, each a different flat colour, with parameters that must never reach the page."""
    for r, run in enumerate(RUNS):
        for i in range(per_run):
            colour = (40 * i, 120 * r + 60, 255 - 30 * i)
            params = a1111_parameters(f"secret prompt {run}", "", steps=20, sampler="DDIM", cfg_scale=7.5,
                                      seed=9000 + i, width=64, height=64)
            save_png_atomic(Image.new("RGB", (64, 64), colour), folder / run / f"{run}_{i:03d}_{9000 + i}.png", params)
    return folder


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.fixture
def db(tmp_path) -> Path:
    folder = write_images(tmp_path / "samples")
    path = tmp_path / "ratings.sqlite"
    result = evaluate("import", "--db", str(path), *(str(folder / run) for run in RUNS))
    assert result.returncode == 0, result.stderr
    return path


def ratings(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT i.sha256, r.rater, r.score, r.no_hand, r.source FROM ratings r "
                            "JOIN images i ON i.id = r.image_id ORDER BY r.id").fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- logic


def test_scores_accepted_and_refused():
    assert [parse_score(v) for v in (0, 0.5, 1, "0", "0.5", "1", "n", "no-hand", 1.0)] == [
        (0.0, False), (0.5, False), (1.0, False), (0.0, False), (0.5, False), (1.0, False), (None, True),
        (None, True), (1.0, False)]
    for bad in (0.25, 2, -1, "x", "", None, True, [0], "0.50"):
        with pytest.raises(BadRequest) as caught:
            parse_score(bad)
        assert caught.value.status == 400


def test_order_is_one_shuffle_of_all_runs_fixed_per_rater(db):
    store = RatingStore(connect(db))
    runs_of = {row["sha256"]: row["run"] for row in store.conn.execute("SELECT sha256, run FROM images")}
    alice = [sha for _, sha in store.order("alice")]
    assert sorted(alice) == sorted(runs_of) and len(alice) == 12
    assert [sha for _, sha in RatingStore(connect(db)).order("alice")] == alice  # fixed: a new server, same order
    assert [sha for _, sha in store.order("bob")] != alice
    # runs are mixed, not shown run after run (ids follow import order, so the order must not)
    sequence = [runs_of[sha] for sha in alice]
    assert sum(a != b for a, b in zip(sequence, sequence[1:])) >= 3


def test_next_skip_undo_and_duplicates(db):
    store = RatingStore(connect(db))
    order = [f"/image/{sha}" for _, sha in store.order("alice")]
    assert store.state("alice")["image"] == order[0]
    store.rate("alice", order[0], "1")
    store.skip("alice", order[1])
    state = store.state("alice")
    assert (state["image"], state["rated"], state["skipped"]) == (order[2], 1, 1)
    note, changed = store.rate("alice", order[0], "0")  # the same image again (a second tab): kept once
    assert not changed and "already" in note
    assert store.undo("alice") == ("undone: your last skip", True)
    assert store.state("alice")["image"] == order[1]
    assert store.undo("alice") == ("undone: your last rating", True)
    assert store.state("alice")["image"] == order[0] and ratings(db) == []
    assert store.undo("alice") == ("nothing to undo", False)
    store.rate("alice", order[0], "n")
    store.rate("bob", order[0], 0.5)  # another rater: both ratings kept
    sha = order[0].rsplit("/", 1)[1]
    assert ratings(db) == [(sha, "alice", None, 1, "human"), (sha, "bob", 0.5, 0, "human")]
    with pytest.raises(BadRequest) as caught:
        store.rate("alice", "/image/" + "0" * 64, "1")
    assert caught.value.status == 404


# --------------------------------------------------------------------------------------------- HTTP


@pytest.fixture
def server(db):
    started = Server(db)
    yield started
    started.kill()


def test_http_surface_serves_only_registered_images_and_valid_scores(server, db):
    status, state = server.request("GET", "/api/state?rater=alice")
    assert status == 200 and state["total"] == 12 and state["image"].startswith("/image/")
    sha = state["image"].rsplit("/", 1)[1]
    status, png = server.request("GET", state["image"])
    assert status == 200 and png == Path(connect(db).execute(
        "SELECT path FROM images WHERE sha256 = ?", (sha,)).fetchone()["path"]).read_bytes()
    # nothing but registered images: crafted paths, file names and unknown hashes are 404
    image_file = Path(connect(db).execute("SELECT path FROM images LIMIT 1").fetchone()["path"])
    for path in ("/image/../../etc/passwd", "/../../etc/passwd", "/etc/passwd", f"/image/{image_file.name}",
                 f"/{image_file}", "/image/" + "f" * 64, "/image/", "/api/../../etc/passwd"):
        assert server.request("GET", path)[0] == 404, path
    for score in (0.25, 2, "maybe", None):
        status, answer = server.request("POST", "/api/rate", {"rater": "alice", "image": state["image"], "score": score})
        assert status == 400 and "give 0, 0.5, 1" in answer["error"]
    assert server.request("POST", "/api/rate", b'{"rater": "alice"', {"Content-Type": "application/json"})[0] == 400
    assert server.request("POST", "/api/rate", b"rater=alice&score=1",
                          {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert server.request("GET", "/api/state?rater=alice", headers={"Host": "rebound.example:7861"})[0] == 403
    assert server.request("GET", "/api/state?rater=counter")[0] == 400
    assert ratings(db) == []  # none of that wrote anything
    status, state = server.request("POST", "/api/rate", {"rater": "alice", "image": state["image"], "score": 0.5})
    assert status == 200 and state["rated"] == 1 and ratings(db) == [(sha, "alice", 0.5, 0, "human")]
    status, page = server.request("GET", "/")
    assert status == 200 and b"wrong number of fingers" in page


def test_token_and_hosts(db):
    refused = evaluate("serve", "--db", str(db), "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("evaluate.py serve: error: --host 0.0.0.0: other computers could reach the "
                                     "page") and "--token" in refused.stderr
    missing = evaluate("serve", "--db", str(db.with_name("typo.sqlite")))
    assert missing.returncode == 2 and "no such rating database" in missing.stderr
    guarded = Server(db, "--token", "correct horse")
    try:
        assert guarded.request("GET", "/api/state?rater=alice")[0] == 401
        assert guarded.request("GET", "/api/state?rater=alice", headers={"Cookie": "pentadactyl_token=wrong"})[0] == 401
        status, state = guarded.request("GET", "/api/state?rater=alice",
                                        headers={"Cookie": "pentadactyl_token=correct%20horse"})
        assert status == 200 and state["total"] == 12
        assert guarded.request("GET", state["image"])[0] == 401
        assert guarded.request("GET", "/")[0] == 200  # the page (no data in it) asks for the token
    finally:
        guarded.kill()


# --------------------------------------------------------------------------------------------- browser


@pytest.mark.slow
def test_rating_in_two_browsers_survives_killing_the_server(tmp_path, db):
    connected = sqlite3.connect(db)
    names = [Path(p).name for (p,) in connected.execute("SELECT path FROM images")]
    connected.close()
    server = Server(db)
    alice = browser(tmp_path, "alice")
    bob = browser(tmp_path, "bob")
    try:
        shown = [sign_in(alice, server.url, "alice")]
        bob_shown = [sign_in(bob, server.url, "bob")]
        # blind: nothing on the page names the run, the prompt, the seed or the file
        page = alice.page_source
        for secret in (*RUNS, "secret prompt", "9000", *names):
            assert secret not in page, secret
        # alice rates three with the keyboard while bob rates and skips in his own browser
        for alice_key, bob_key in (("0", "1"), ("5", "s"), ("n", "5")):
            press(alice, alice_key)
            press(bob, bob_key)
            shown.append(wait_ready(alice, shown[-1]))
            bob_shown.append(wait_ready(bob, bob_shown[-1]))
        sha = [url.rsplit("/", 1)[1] for url in shown]
        assert len(set(sha)) == 4
        alice_rows = [r for r in ratings(db) if r[1] == "alice"]
        assert alice_rows == [(sha[0], "alice", 0.0, 0, "human"), (sha[1], "alice", 0.5, 0, "human"),
                              (sha[2], "alice", None, 1, "human")]
        bob_sha = [url.rsplit("/", 1)[1] for url in bob_shown]
        assert [r for r in ratings(db) if r[1] == "bob"] == [(bob_sha[0], "bob", 1.0, 0, "human"),
                                                             (bob_sha[2], "bob", 0.5, 0, "human")]
        # bob undoes his last rating: the image comes back, the row is gone, the skip stays
        press(bob, "u")
        assert wait_ready(bob, bob_shown[-1]) == bob_shown[2]
        assert [r[0] for r in ratings(db) if r[1] == "bob"] == [bob_sha[0]]

        server.kill()  # SIGKILL: no clean shutdown, nothing flushed at exit
        server = Server(db)
        again = open_as(alice, server.url, "alice")
        assert again == shown[3], "after the restart alice continues with her fourth image"
        assert [r[0] for r in ratings(db) if r[1] == "alice"] == sha[:3]
        progress = alice.find_element("id", "progress").text
        assert progress == "3 of 12 rated by you"
        # bob carries on too: the image after his skip is the one he undid
        assert open_as(bob, server.url, "bob") == bob_shown[2]
        # the report, asked for at the end, is where the runs appear
        alice.execute_script("window.confirm = () => true")
        press(alice, "r")
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(alice, 10).until(lambda d: d.execute_script("return document.body.dataset.state") == "report")
        report = alice.find_element("id", "report").text
        assert "Report: 3 ratings by alice" in report and ("run-alpha" in report or "run-beta" in report)
    finally:
        alice.quit()
        bob.quit()
        server.kill()
