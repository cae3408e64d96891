"""A toy hand world: stylised hands with study-style captions, non-hand objects, and a finger counter.

It reproduces the hand study in miniature without real SD1.5 weights: hands drawn procedurally (palm,
digits, thumb; pose, size, rotation, left/right, front/back, skin tone, polish, jewellery, background)
with captions in the study's 11K-Hands grammar, which never says how many fingers a hand has, so a
model has to learn "a hand has five digits" from the images alone. The finger counter
(`library/evaluate/counter.py`, re-exported here) then plays the study's bespoke classifier: the share
of generated hands with five digits; `evaluate.py rate-with-counter` uses it as a rater.

It lives beside `library/` and `bench/`, not inside the library: study.py runs the top-level scripts
(train_network.py, ...) and everything here uses `library/`, while nothing in `library/` imports it. Run
its commands from the repository root (`python -m toy_hands.study`), as the scripts are run.

Files:
    params.py   HandParams / ObjectParams, digit-count mixes (clean: always 5 digits; web-like: a chosen
                share), poses (any, web, spread), captions
    random_hands.py  random HandParams / ObjectParams of a mix and pose, fitted to the image
    draw.py     draw_hand / draw_object: polygons at 4× size, downsampled (anti-aliased)
    folder.py   examples by (seed, index), write_hand_folder (PNG + caption + manifest), read_manifest
    augment.py  blur, noise, colour shift, resampling, JPEG: what generated images suffer
    pretrain.py the script that trained the shipped toy hand model (toy-hands-sd1.safetensors)
    prepare.py  the toy study's datasets (prepare_dataset.py toy-hands): clean hands, palms, the base
                model's generations sorted by the counter
    study.py    the hand study in miniature on that model: dataset_configs/study_toy.toml through the study
                runner (library/study/), the same code path as the SD1.5 study

Typical use:

    write_hand_folder("data/clean", 200, seed=1, pose="spread")                # fine-tuning set: 5 digits
    write_hand_folder("data/web", 5000, seed=2, five_finger_share=0.5, object_share=0.2, pose="web")  # pretraining
    images = [...generated from "back of dark-skinned female left hand"...]
    share = sum(count_fingers(im) == 5 for im in images) / len(images)
"""

from pathlib import Path

from toy_hands.augment import degrade
from library.evaluate.counter import FingerCount, analyse_hand, count_fingers
from toy_hands.draw import draw_hand, draw_object, hand_extent, hand_geometry
from toy_hands.folder import MANIFEST, read_manifest, render, sample_example, write_hand_folder
from toy_hands.params import (
    BACKGROUNDS, CLEAN_COUNTS, OBJECT_KINDS, POSES, SKIN_TONES, HandParams, ObjectParams, caption_for, web_like_counts,
)
from toy_hands.random_hands import sample_hand_params, sample_object_params

# The pretrained toy hand model (a single-file SD1-architecture checkpoint), made by pretrain.py.
TOY_MODEL_PATH = Path(__file__).with_name("toy-hands-sd1.safetensors")

__all__ = [
    "BACKGROUNDS", "CLEAN_COUNTS", "MANIFEST", "OBJECT_KINDS", "POSES", "SKIN_TONES", "TOY_MODEL_PATH", "FingerCount", "HandParams",
    "ObjectParams", "analyse_hand", "caption_for", "count_fingers", "degrade", "draw_hand", "draw_object",
    "hand_extent", "hand_geometry", "read_manifest", "render", "sample_example", "sample_hand_params",
    "sample_object_params", "web_like_counts", "write_hand_folder",
]
