"""A toy hand world: stylised hands with study-style captions, non-hand objects, and a finger counter.

It reproduces the hand study in miniature without real SD1.5 weights: hands drawn procedurally (palm,
digits, thumb; pose, size, rotation, left/right, front/back, skin tone, polish, jewellery, background)
with captions in the study's 11K-Hands grammar, which never says how many fingers a hand has, so a
model has to learn "a hand has five digits" from the images alone. The counter then plays the study's
bespoke classifier: the share of generated hands with five digits.

Files:
    params.py   HandParams / ObjectParams, samplers (clean: always 5 digits; web-like: a chosen share;
                poses: any, web, spread), captions
    draw.py     draw_hand / draw_object: polygons at 4× size, downsampled (anti-aliased)
    folder.py   examples by (seed, index), write_hand_folder (PNG + caption + manifest), read_manifest
    counter.py  count_fingers / analyse_hand: classical geometry, numpy + PIL only
    augment.py  blur, noise, colour shift, resampling, JPEG: what generated images suffer
    pretrain.py the script that trained the shipped toy hand model (toy-hands-sd1.safetensors)
    study.py    the hand study in miniature on that model; report.py its scores, table and plot

Typical use:

    write_hand_folder("data/clean", 200, seed=1, pose="spread")                # fine-tuning set: 5 digits
    write_hand_folder("data/web", 5000, seed=2, five_finger_share=0.5, object_share=0.2, pose="web")  # pretraining
    images = [...generated from "back of dark-skinned female left hand"...]
    share = sum(count_fingers(im) == 5 for im in images) / len(images)
"""

from pathlib import Path

from library.toy_hands.augment import degrade
from library.toy_hands.counter import FingerCount, analyse_hand, count_fingers
from library.toy_hands.draw import draw_hand, draw_object, hand_extent, hand_geometry
from library.toy_hands.folder import MANIFEST, read_manifest, render, sample_example, write_hand_folder
from library.toy_hands.params import (
    BACKGROUNDS, CLEAN_COUNTS, OBJECT_KINDS, POSES, SKIN_TONES, HandParams, ObjectParams, caption_for, sample_hand_params,
    sample_object_params, web_like_counts,
)

# The pretrained toy hand model (a single-file SD1-architecture checkpoint), made by pretrain.py.
TOY_MODEL_PATH = Path(__file__).with_name("toy-hands-sd1.safetensors")

__all__ = [
    "BACKGROUNDS", "CLEAN_COUNTS", "MANIFEST", "OBJECT_KINDS", "POSES", "SKIN_TONES", "TOY_MODEL_PATH", "FingerCount", "HandParams",
    "ObjectParams", "analyse_hand", "caption_for", "count_fingers", "degrade", "draw_hand", "draw_object",
    "hand_extent", "hand_geometry", "read_manifest", "render", "sample_example", "sample_hand_params",
    "sample_object_params", "web_like_counts", "write_hand_folder",
]
