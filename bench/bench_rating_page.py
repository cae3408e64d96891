"""How fast the rating page takes keyboard ratings, and its screenshot for the README.

    python bench/bench_rating_page.py --images 120 --screenshot docs/rating-page.png

Draws toy hands in two runs, imports them into a fresh database, starts `evaluate.py serve` and drives
headless Chromium (Debian's chromium + chromium-driver, through selenium): it signs in, takes the
screenshot, then presses a rating key as soon as the page accepts one (the next image loaded and shown)
until every image is rated. What the number measures: the page's and the server's round trip per rating
(POST, SQLite commit, next image fetched and decoded) on this machine, i.e. the ceiling the tool puts on
a rater; a person deciding about each hand is far slower.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--screenshot", default=None, help="write the page's screenshot (PNG) here")
    args = parser.parse_args()

    from PIL import Image

    from library.sampling.infotext import a1111_parameters, save_png_atomic
    from support import Server, browser, press, sign_in, wait_ready
    from toy_hands import draw_hand, sample_hand_params, web_like_counts

    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.images):
            run = ("base", "lora")[i % 2]
            params = sample_hand_params(rng, counts=web_like_counts(0.5), pose="spread")
            image = draw_hand(params, 64).resize((256, 256), Image.Resampling.LANCZOS)
            save_png_atomic(image, tmp / run / f"{run}_{i:03d}_{i}.png",
                            a1111_parameters("a hand", "", steps=30, sampler="DDIM", cfg_scale=7.5, seed=i,
                                             width=256, height=256))
        db = tmp / "ratings.sqlite"
        subprocess.run([sys.executable, str(REPO / "evaluate.py"), "import", "--db", str(db), str(tmp / "base"),
                        str(tmp / "lora")], check=True, cwd=REPO)
        server = Server(db)
        driver = browser(tmp, "chromium")
        try:
            shown = sign_in(driver, server.url, "rater-1")
            if args.screenshot:
                for key in "155":  # a few ratings first, so that the progress line has something to say
                    press(driver, key)
                    shown = wait_ready(driver, shown)
                driver.set_window_size(1100, 640)
                time.sleep(0.3)
                driver.save_screenshot(args.screenshot)
                print(f"wrote {args.screenshot}")
            keys = "0510"
            remaining = args.images - (3 if args.screenshot else 0)
            began = time.perf_counter()
            for n in range(remaining - 1):
                press(driver, keys[n % len(keys)])
                shown = wait_ready(driver, shown)
            press(driver, "1")
            from selenium.webdriver.support.ui import WebDriverWait
            WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
            seconds = time.perf_counter() - began
            print(f"{remaining} ratings in {seconds:.1f} s: {remaining / seconds * 60:.0f} images per minute "
                  f"({seconds / remaining * 1000:.0f} ms per rating, keyboard, headless Chromium, local server)")
        finally:
            driver.quit()
            server.kill()


if __name__ == "__main__":
    main()
