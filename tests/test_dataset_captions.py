"""Caption processing (pure, fixed seeds) and caption-file reading."""

import numpy as np
import pytest

from library.dataset.captions import (
    CaptionOptions,
    base_caption,
    base_captions,
    process_caption,
    read_caption_file,
    tag_frequency,
)
from library.errors import DatasetError

CAPTION = "hand, palm, five fingers, wrinkles, close-up, studio light"


def run(opts: CaptionOptions, seed: int = 0, epoch: int = 1, step: int = 0, caption: str = CAPTION, **kw) -> str:
    return process_caption(caption, opts, np.random.default_rng(seed), epoch=epoch, step=step, **kw)


def test_plain_caption_is_untouched():
    assert run(CaptionOptions()) == CAPTION


def test_shuffle_keeps_leading_tokens_and_all_tags():
    opts = CaptionOptions(shuffle=True, keep_tokens=2)
    outs = {run(opts, seed=s) for s in range(20)}
    assert len(outs) > 5  # it does shuffle
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["hand", "palm"]
        assert sorted(tags) == sorted(CAPTION.split(", "))


def test_fixed_seed_gives_fixed_captions():
    opts = CaptionOptions(shuffle=True, tag_dropout_rate=0.3, keep_tokens=1)
    assert [run(opts, seed=s) for s in (2, 1, 0)] == [run(opts, seed=s) for s in (0, 1, 2)][::-1]  # no hidden state
    # pinned: a change here changes what resumed runs train on
    assert run(opts, seed=0) == "hand, studio light, close-up, palm, five fingers"
    assert run(opts, seed=1) == "hand, studio light, palm, wrinkles, five fingers, close-up"
    assert run(opts, seed=2) == "hand, five fingers, wrinkles"


def test_dropout_rate_and_every_n_epochs():
    always = CaptionOptions(dropout_rate=1.0)
    assert run(always) == ""
    half = CaptionOptions(dropout_rate=0.5)
    dropped = sum(run(half, seed=s) == "" for s in range(400))
    assert 150 < dropped < 250
    every = CaptionOptions(dropout_every_n_epochs=3)
    assert [run(every, epoch=e) == "" for e in range(1, 7)] == [False, False, True, False, False, True]


def test_tag_dropout_never_drops_kept_tokens():
    opts = CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1)
    lengths = []
    for s in range(50):
        tags = run(opts, seed=s).split(", ")
        assert tags[0] == "hand"
        lengths.append(len(tags))
    assert min(lengths) < 6 and max(lengths) <= 6


def test_token_warmup_grows_with_the_step():
    opts = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    counts = [len(run(opts, step=s).split(", ")) for s in (0, 5, 10, 50)]
    # floor(step · (6 - 1) / 10) + 1
    assert counts == [1, 3, 6, 6]


def test_prefix_suffix_stay_in_place_and_replacements_apply_last():
    opts = CaptionOptions(shuffle=True, prefix="photo of <hand>,", suffix=", high quality")
    for s in range(5):
        out = run(opts, seed=s, replacements={"<hand>": "<hand> <hand1> <hand2>"})
        assert out.startswith("photo of <hand> <hand1> <hand2>, ")
        assert out.endswith(" , high quality")


def test_base_caption_caption_file_then_templates_then_class_tokens():
    templates = ("a photo of a {}", "a close-up of a {}")
    assert base_caption("from file", "palm", templates, "<hand>", template=1) == "from file"
    assert base_captions("from file", "palm", templates, "<hand>") == ["from file"]
    # {} is the subset's class_tokens; textual inversion's token only where the subset has none
    assert base_caption(None, "palm", templates, "<hand>", template=1) == "a close-up of a palm"
    assert base_caption(None, None, templates, "<hand>") == "a photo of a <hand>"
    assert base_caption(None, None, templates, None) == "a photo of a "
    assert base_captions(None, None, templates, "<hand>") == ["a photo of a <hand>", "a close-up of a <hand>"]
    # no templates: class_tokens, or the empty caption
    assert base_caption(None, "palm", None, "<hand>") == "palm"
    assert base_captions(None, None, (), "<hand>") == [""]


def test_tag_frequency():
    assert tag_frequency(["a, b", "b, c ,", " b"]) == {"a": 1, "b": 3, "c": 1}


def test_caption_file_reading(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("\ufeffhand, palm\nsecond line ignored\n", encoding="utf-8")
    assert read_caption_file(good, strict=True).text == "hand, palm"

    empty = tmp_path / "b.txt"
    empty.write_bytes(b"")
    read = read_caption_file(empty, strict=False)
    assert read.text is None and "b.txt" in read.warning and "empty" in read.warning
    with pytest.raises(DatasetError, match="b.txt.*empty"):
        read_caption_file(empty, strict=True)

    latin = tmp_path / "c.txt"
    latin.write_bytes("caf\xe9, hand".encode("cp1252"))
    read = read_caption_file(latin, strict=False)
    assert read.text == "café, hand" and "c.txt" in read.warning and "UTF-8" in read.warning
    with pytest.raises(DatasetError, match="c.txt.*not UTF-8"):
        read_caption_file(latin, strict=True)


# ---- sd-scripts' caption keys: enable_wildcard, keep_tokens_separator, secondary_separator ----------------

SPLIT = "hand, palm ||| five fingers, wrinkles, close-up, studio light ||| masterpiece"


def test_wildcard_fixed_seed_gives_a_known_choice():
    opts = CaptionOptions(wildcard=True)
    caption = "{red|green|blue} hand, palm"
    # the choice is the first draw of the child generator: default_rng(seed).spawn(1)[0].integers(3)
    expected = {0: "blue", 1: "red", 2: "red", 3: "green"}
    for seed, colour in expected.items():
        assert int(np.random.default_rng(seed).spawn(1)[0].integers(3)) == ["red", "green", "blue"].index(colour)
        assert run(opts, seed=seed, caption=caption) == f"{colour} hand, palm"


def test_every_wildcard_option_appears_over_many_seeds_and_nothing_else():
    opts = CaptionOptions(wildcard=True)
    outs = {run(opts, seed=s, caption="a {red|green|blue} hand, {palm|back}") for s in range(300)}
    assert outs == {f"a {c} hand, {side}" for c in ("red", "green", "blue") for side in ("palm", "back")}
    # one option, escaped braces, and an unmatched brace
    assert run(opts, caption="{only} {{literal}} {a|b", seed=0) == "only {literal} {a|b"
    # without enable_wildcard the braces are plain text
    assert run(CaptionOptions(), caption="{red|blue} hand") == "{red|blue} hand"


def test_wildcard_multi_line_caption_is_one_line_per_sample(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one hand\n\n  hand, {palm|back}  \n", encoding="utf-8")
    assert read_caption_file(path, strict=True).text == "one hand"  # the first line, as before
    text = read_caption_file(path, strict=True, all_lines=True).text
    assert text == "one hand\nhand, {palm|back}"  # empty lines left out, lines stripped
    opts = CaptionOptions(wildcard=True)
    # seed 0: the child generator draws 1 (second line), then 1 (back); seed 1: 0 (first line)
    assert run(opts, seed=0, caption=text) == "hand, back" and run(opts, seed=1, caption=text) == "one hand"
    assert {run(opts, seed=s, caption=text) for s in range(200)} == {"one hand", "hand, palm", "hand, back"}
    assert run(CaptionOptions(), caption=text) == "one hand"  # wildcards off: the first line


def test_wildcards_leave_the_other_draws_alone():
    """Wildcard choices come from a child generator: a caption without wildcards is shuffled and dropped exactly
    as with enable_wildcard off, so the pinned captions above stay what resumed runs train on."""
    for s in range(20):
        plain = CaptionOptions(shuffle=True, tag_dropout_rate=0.3, keep_tokens=1)
        assert run(plain, seed=s) == run(CaptionOptions(shuffle=True, tag_dropout_rate=0.3, keep_tokens=1,
                                                        wildcard=True), seed=s)


def test_keep_tokens_separator_fixed_parts_never_move():
    opts = CaptionOptions(keep_tokens_separator="|||", shuffle=True, tag_dropout_rate=0.3, keep_tokens=3)
    middle = {"five fingers", "wrinkles", "close-up", "studio light"}
    seen = set()
    for s in range(200):
        tags = run(opts, seed=s, caption=SPLIT).split(", ")
        assert tags[:2] == ["hand", "palm"] and tags[-1] == "masterpiece"  # keep_tokens = 3 is not used
        assert set(tags[2:-1]) <= middle and len(set(tags[2:-1])) == len(tags) - 3
        seen.add(tuple(tags[2:-1]))
        assert "|||" not in ", ".join(tags)
    assert len(seen) > 20  # the middle is shuffled and dropped
    # seed 0: the middle [five fingers, wrinkles, close-up, studio light] is permuted by [3, 2, 0, 1] ->
    # [studio light, close-up, five fingers, wrinkles]; the dropout draws 0.017, 0.81, 0.91, 0.61 drop the first
    assert run(opts, seed=0, caption=SPLIT) == "hand, palm, close-up, five fingers, wrinkles, masterpiece"
    # seed 1: permutation [3, 0, 1, 2], draws 0.95, 0.31, 0.42, 0.83: nothing dropped
    assert run(opts, seed=1, caption=SPLIT) == "hand, palm, studio light, five fingers, wrinkles, close-up, masterpiece"


def test_keep_tokens_separator_without_shuffle_and_without_the_separator():
    opts = CaptionOptions(keep_tokens_separator="|||")
    # nothing shuffled: the separator is still taken out (sd-scripts would train on "|||")
    assert run(opts, caption=SPLIT) == "hand, palm, five fingers, wrinkles, close-up, studio light, masterpiece"
    assert run(opts, caption="a ||| b ||| c ||| d") == "a, b, c, d"  # a third one only separates tags
    # a caption without the separator falls back to keep_tokens
    shuffled = CaptionOptions(keep_tokens_separator="|||", shuffle=True, keep_tokens=2)
    for s in range(20):
        assert run(shuffled, seed=s).startswith("hand, palm, ")
    # one separator: everything after it is shuffled; token warm-up cuts only the middle part
    warm = CaptionOptions(keep_tokens_separator="|||", token_warmup_min=1, token_warmup_step=10)
    assert run(warm, caption=SPLIT, step=0) == "hand, palm, five fingers, masterpiece"
    assert run(warm, caption=SPLIT, step=10) == run(opts, caption=SPLIT)
    # the prefix and suffix stay fixed; a separator in them is taken out
    fixed = CaptionOptions(keep_tokens_separator="|||", prefix="hndstyle |||", suffix="||| best")
    assert run(fixed, caption="a ||| b") == "hndstyle a, b best"


def test_secondary_separator_groups_stay_together():
    caption = "red hair;;;long hair, smile, blue eyes;;;open mouth, hand"
    opts = CaptionOptions(secondary_separator=";;;", shuffle=True, tag_dropout_rate=0.4)
    groups = {"red hair,long hair", "smile", "blue eyes,open mouth", "hand"}
    orders = set()
    for s in range(200):
        out = run(opts, seed=s, caption=caption)
        tags = out.split(", ") if out else []
        assert set(tags) <= groups and len(tags) == len(set(tags))
        orders.add(tuple(tags))
        assert ";;;" not in out
    assert len(orders) > 20
    # not shuffled: the separator becomes caption_separator (sd-scripts), the same tokens as ", "
    assert run(CaptionOptions(secondary_separator=";;;"), caption=caption) == \
        "red hair,long hair, smile, blue eyes,open mouth, hand"
    assert run(CaptionOptions(secondary_separator=";;;", separator="."), caption="a;;;b. c") == "a.b. c"


def test_caption_keys_together_in_sd_scripts_order():
    opts = CaptionOptions(wildcard=True, keep_tokens_separator="|||", secondary_separator=";;;", shuffle=True,
                          prefix="{photo|drawing} of")
    caption = "<hand> ||| {red|blue} nails;;;long nails, palm, {wrinkles|scars} ||| {best|good} quality"
    outs = set()
    for s in range(300):
        out = run(opts, seed=s, caption=caption, replacements={"<hand>": "<hand> <hand1>"})
        outs.add(out)
        head, _, rest = out.partition(" <hand> <hand1>, ")
        assert head in ("photo of", "drawing of")
        middle, _, end = rest.rpartition(", ")
        assert end in ("best quality", "good quality")
        assert sorted(middle.split(", ")) in [sorted([a, b, "palm"]) for a in ("red nails,long nails",
                                                                                "blue nails,long nails")
                                              for b in ("scars", "wrinkles")]
    assert len(outs) > 50
    assert run(CaptionOptions(wildcard=True, dropout_rate=1.0), caption=caption) == ""  # dropout comes first


def test_same_seed_epoch_and_sample_give_the_same_caption():
    from library.dataset.plan import caption_rng

    opts = CaptionOptions(wildcard=True, keep_tokens_separator="|||", secondary_separator=";;;", shuffle=True,
                          tag_dropout_rate=0.2)
    caption = "a ||| {b|c|d}, e;;;f, g, h\nx ||| {y|z}, w"
    for key in [(7, 1, 0, 0), (7, 2, 0, 5), (123, 3, 1, 2)]:
        seed, epoch, d, sid = key
        first = process_caption(caption, opts, caption_rng(seed, epoch, d, sid), epoch=epoch)
        again = process_caption(caption, opts, caption_rng(seed, epoch, d, sid), epoch=epoch)
        assert first == again
    per_epoch = {process_caption(caption, opts, caption_rng(7, e, 0, 0), epoch=e) for e in range(1, 40)}
    assert len(per_epoch) > 10  # chosen again each epoch


def test_tag_frequency_reads_lines_and_the_separators():
    caps = ["a ||| b;;;c\nd", "b, e"]
    assert tag_frequency(caps, ",", ("|||", ";;;")) == {"a": 1, "b": 2, "c": 1, "d": 1, "e": 1}


# ---- the keys in dataset tables and jobs ------------------------------------------------------------------


def _tables(sub=None, general=None, ds=None):
    return {"general": general or {}, "datasets": [{**(ds or {}), "subsets": [{"image_dir": "a", **(sub or {})}]}]}


def test_caption_keys_resolve_subset_dataset_general_job(tmp_path):
    from library.dataset import resolve_datasets

    [d] = resolve_datasets({"enable_wildcard": True}, _tables(general={"keep_tokens_separator": "|||"},
                                                              ds={"secondary_separator": ";;;"}), "job.toml", tmp_path)
    opts = d.subsets[0].caption
    assert (opts.keep_tokens_separator, opts.secondary_separator, opts.wildcard) == ("|||", ";;;", True)
    [d] = resolve_datasets({}, _tables(sub={"keep_tokens_separator": "", "enable_wildcard": False},
                                       general={"keep_tokens_separator": "|||", "enable_wildcard": True}),
                           "job.toml", tmp_path)
    opts = d.subsets[0].caption
    # "" is no separator (sd-scripts' own default, written so by its --output_config): the subset turns it off
    assert opts.keep_tokens_separator is None and not opts.wildcard and opts.secondary_separator is None


@pytest.mark.parametrize("sub, message", [
    ({"keep_tokens_separator": 3}, r"'keep_tokens_separator' must be a string, got int 3"),
    ({"secondary_separator": ["a"]}, r"'secondary_separator' must be a string"),
    ({"enable_wildcard": "yes"}, r"'enable_wildcard' must be true or false"),
    ({"keep_tokens_separator": "  "}, r"'keep_tokens_separator' = '  ' is only white space.*'\|\|\|'"),
    ({"secondary_separator": "\t"}, r"'secondary_separator' = '\\t' is only white space.*';;;'"),
    ({"keep_tokens_separator": ","}, r"'keep_tokens_separator' = ',' is the caption_separator itself"),
    ({"secondary_separator": ";,;"}, r"'secondary_separator' = ';,;' contains caption_separator ','"),
    ({"keep_tokens_separator": "||", "secondary_separator": "|||"}, r"keep_tokens_separator '\|\|' and secondary_separator '\|\|\|' overlap"),
    ({"caption_separator": ""}, r"'caption_separator' is empty"),
])
def test_bad_caption_key_values_name_the_key(tmp_path, sub, message):
    from library.dataset import resolve_datasets
    from library.errors import ConfigError

    with pytest.raises(ConfigError, match=r"job.toml \[\[datasets\]\] #1 \[\[datasets.subsets\]\] #1: " + message):
        resolve_datasets({}, _tables(sub=sub), "job.toml", tmp_path)


def test_a_job_with_the_caption_keys_loads(tmp_path):
    from library.config import load_job
    from library.errors import ConfigError
    from support import write_job_file

    images = tmp_path / "img"
    images.mkdir()
    path = write_job_file(tmp_path, {"pretrained_model_name_or_path": "model.safetensors", "enable_wildcard": True,
                                     "secondary_separator": ";;;"},
                          [{"image_dir": str(images), "keep_tokens_separator": "|||"}])
    job = load_job("train_network", config_path=str(path))
    opts = job.datasets[0].subsets[0].caption
    assert (opts.keep_tokens_separator, opts.secondary_separator, opts.wildcard) == ("|||", ";;;", True)
    text = job.to_toml()  # what --print_config prints
    assert 'secondary_separator = ";;;"' in text and "enable_wildcard = true" in text
    assert '"keep_tokens_separator": "|||"' in text
    # on the command line too, as sd-scripts' --keep_tokens_separator
    job = load_job("train_network", ["--config", str(path), "--keep_tokens_separator", "###"])
    assert job.datasets[0].subsets[0].caption.keep_tokens_separator == "###"
    with pytest.raises(ConfigError, match=r"job.toml line \d+: 'enable_wildcard' must be true or false"):
        path.write_text(path.read_text().replace("enable_wildcard = true", 'enable_wildcard = "on"'))
        load_job("train_network", config_path=str(path))


def test_dry_run_and_dataset_show_the_caption_keys(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from library.dataset import TrainDataset, resolve_datasets
    from library.dataset.__main__ import main as dry_run_main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (50 * i, 100, 150)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"img{i} ||| {{red|blue}} nails;;;long nails, palm, wrinkles ||| best\n"
                                         f"img{i} ||| back, {{scars|freckles}}\n", encoding="utf-8")
    table = {"general": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64, "shuffle_caption": True,
                         "enable_wildcard": True, "keep_tokens_separator": "|||", "secondary_separator": ";;;"},
             "datasets": [{"batch_size": 2, "subsets": [{"image_dir": str(folder), "num_repeats": 2}]}]}
    data = TrainDataset(resolve_datasets({}, table, "job.toml", tmp_path), seed=5, num_workers=0)
    # resume: the same (seed, epoch, sample) gives the same caption, and so the tail of an epoch
    again = TrainDataset(resolve_datasets({}, table, "job.toml", tmp_path), seed=5, num_workers=0)
    for epoch in (1, 2):
        for sid in range(len(data.layout.samples[0])):
            assert data.caption_for(epoch, 0, sid, step=0) == again.caption_for(epoch, 0, sid, step=0)
        whole = [b["captions"] for b in data.batch_plan(epoch)]
        assert [b["captions"] for b in again.batch_plan(epoch, start=1)] == whole[1:]
    captions = {data.caption_for(e, 0, sid, 0) for e in range(1, 30) for sid in range(6)}
    for c in captions:
        assert c.startswith("img") and "|||" not in c and ";;;" not in c and "{" not in c
    assert any("scars" in c for c in captions) and any("blue nails,long nails" in c for c in captions)
    # the length check sees each line with its longest options
    longest = {c for _, c in data.full_captions()}
    assert "img0, blue nails,long nails, palm, wrinkles, best" in longest and "img0, back, freckles" in longest
    assert '"enable_wildcard": true' in data.training_metadata()["ss_datasets"]

    job = tmp_path / "job.toml"
    from library.schema import job_toml
    job.write_text(job_toml({"pretrained_model_name_or_path": "not-loaded.safetensors"}, table["general"],
                            table["datasets"]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert dry_run_main(["--config", str(job), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "options: shuffle_caption (keep_tokens 0), keep_tokens_separator '|||', secondary_separator ';;;', " \
           "enable_wildcard" in out
    assert "|||" not in out.split("batches (captions as trained")[1]
