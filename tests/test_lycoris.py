"""LyCORIS networks: trained through the lycoris-lora package (network_module = "lycoris.kohya"), read back by
our own implementation of each algorithm (networks/algorithms.py), which never calls the package.

The oracle everywhere: a model with the package's network applied (its own forward pass) gives the outputs
of a fresh model with our reader's update merged in or patched on, within a tolerance fitting float32 (the
two compute the same sums in different orders). Tests that need the package skip without it.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from library.errors import ConfigError, NetworkFileError
from support import write_job, write_job_file

ALGORITHMS = {  # the job's network_args per case, and the tensor names its file must hold
    "loha": (["algo=loha", "conv_dim=2", "conv_alpha=1"],
             {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "lokr": (["algo=lokr", "factor=4", "conv_dim=2"], {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "ia3": (["algo=ia3", "preset=ia3"], {"weight", "on_input"}),
    "dora": (["algo=lora", "dora_wd=True", "conv_dim=2"],
             {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}),
}
TITLES = {"loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)^3", "dora": "LoRA + DoRA"}


@pytest.fixture(scope="module")
def kohya():
    return pytest.importorskip("lycoris.kohya")


@pytest.fixture(scope="module")
def base(tiny_single_file):
    from library.models.loading import load_sd1

    return load_sd1(tiny_single_file)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """Equal to a tolerance relative to the values' scale (both are float32 sums in different orders)."""
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rel * scale + 1e-6, f"{what}: max difference {error:.3g} at scale {scale:.3g}"


def outputs(model, unet=None, text_encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder states, U-Net output) for a fixed input."""
    unet, text_encoder = unet or model.unet, text_encoder or model.text_encoder
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    ids = model.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids).last_hidden_state
        return states, unet(x, t, encoder_hidden_states=states).sample


# ---------------------------------------------------------------- training through the package, per algorithm
@pytest.fixture(scope="module")
def trained(kohya, tiny_single_file, shapes_dir, tmp_path_factory):
    """A few steps of train_network.py per algorithm: {case: (result, file)}."""
    from support import run_job

    runs = {}
    for case, (args, _) in ALGORITHMS.items():
        folder = tmp_path_factory.mktemp(case)
        result = run_job(write_job(folder, tiny_single_file, shapes_dir, network_module="lycoris.kohya",
                                   network_args=args, max_train_steps=4, learning_rate=1e-2, output_name=case))
        result.method.train_mode(False)
        runs[case] = (result, result.final_files[0])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ALGORITHMS))
def test_trained_file_has_lycoris_names_and_our_reader_reproduces_the_package(case, trained, base):
    from networks import load_network_file, merge_weights, network_from_weights
    from networks.algorithms import effective_delta
    from networks.files import group_by_module, normalize_names

    result, path = trained[case]
    assert path.name == f"{case}.safetensors" and all(torch.isfinite(torch.tensor(result.losses)))
    tensors, meta = load_network_file(path)
    modules = {key.split(".", 1)[0] for key in tensors}
    parts = {key.split(".", 1)[1] for key in tensors}
    assert parts == ALGORITHMS[case][1], parts
    assert all(m.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for m in modules)
    assert any(m.startswith("lora_te_") for m in modules) and any(m.startswith("lora_unet_") for m in modules)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"])["algo"] == ("lora" if case == "dora" else case)
    if case == "ia3":  # the preset's feed-forward outputs are scaled on their input side
        assert {bool(v) for k, v in tensors.items() if k.endswith(".on_input")} == {True, False}
        assert all(v.dtype == torch.int64 for k, v in tensors.items() if k.endswith(".on_input"))

    # the weights moved: some module changes its layer
    fresh_unet, fresh_te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    from networks.apply import match_modules

    grouped = group_by_module(normalize_names(tensors))
    layers = match_modules(grouped, fresh_unet, fresh_te, str(path))
    changes = [float(effective_delta(grouped[n], layer.module.weight).abs().max()) for n, layer in layers.items()]
    assert max(changes) > 1e-4

    # the oracle: the package's network in the trained model = our reader merged into / patched on a fresh one
    want_states, want_out = outputs(result.model)
    base_states, base_out = outputs(base)
    assert float((want_out - base_out).abs().max()) > 1e-3 * float(base_out.abs().max())  # the network acts
    network = network_from_weights(tensors, fresh_unet, fresh_te)
    network.apply_to()
    states, out = outputs(base, fresh_unet, fresh_te)
    close(states, want_states, f"{case}: text encoder, patched")
    close(out, want_out, f"{case}: U-Net, patched")
    network.restore()
    merge_weights(tensors, fresh_unet, fresh_te, 1.0)
    states, out = outputs(base, fresh_unet, fresh_te)
    close(states, want_states, f"{case}: text encoder, merged")
    close(out, want_out, f"{case}: U-Net, merged")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ALGORITHMS))
def test_check_lora_names_the_algorithm(case, trained, capsys):
    from networks.check_lora import inspect_file, main

    _, path = trained[case]
    report = inspect_file(path)
    assert {m.algorithm for m in report.modules} == {TITLES[case]}
    assert not report.unknown and report.unsupported is None
    if case == "ia3":
        assert all(m.rank is None and m.alpha is None for m in report.modules)
    else:  # a LoKr of two full factors has no rank (scale 1)
        assert {m.rank for m in report.modules} <= {2, 4, None}
        assert all((m.rank is None) == (m.alpha is None) for m in report.modules)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    title = "LoRA" if case == "dora" else TITLES[case]
    assert f"algorithm: LyCORIS {title} x{len(report.modules)}" in out or (
        case == "dora" and "algorithm: LoRA/LoCon" in out and "dora_scale (DoRA)" in out)
    assert TITLES[case] in out  # the part table's algorithm column


@pytest.mark.slow
def test_sample_py_with_a_lycoris_file_gives_the_package_models_image(trained, tiny_single_file, tmp_path):
    """sample.py with the LoHa file, listed (merged) and as a <lora:name:1> prompt tag (patched), makes the image
    that the model with the package's trained network makes."""
    from library.config import load_job
    from library.models.loading import load_sd1
    from library.sampling.job import specs_from_job
    from library.sampling.run import job_sampler, run_sample_job

    result, path = trained["loha"]
    common = dict(pretrained_model_name_or_path=str(tiny_single_file), sampler="ddim", steps=2, width=64, height=64,
                  seeds=[1], negative_prompt="blurry")
    listed = load_job("sample", ["--config", str(write_job_file(tmp_path / "listed", {
        **common, "output_dir": str(tmp_path / "listed" / "out"), "prompt": "a red circle",
        "networks": [f"{path}:1"]}))])
    tagged = load_job("sample", ["--config", str(write_job_file(tmp_path / "tagged", {
        **common, "output_dir": str(tmp_path / "tagged" / "out"), "prompt": "a red circle <lora:loha:1>",
        "lora_dir": str(path.parent)}))])
    merged = run_sample_job(listed, progress=False).images[0].latents
    patched = run_sample_job(tagged, progress=False).images[0].latents
    sampler = job_sampler(result.model, listed, device="cpu", sampler=listed.sampler, progress=False)
    with torch.no_grad():
        want = sampler.generate(specs_from_job(listed)[0], [1], 1)[0].latents
    with torch.no_grad():
        plain = job_sampler(load_sd1(tiny_single_file), listed, device="cpu", sampler=listed.sampler,
                            progress=False).generate(specs_from_job(listed)[0], [1], 1)[0].latents
    assert float((want - plain).abs().max()) > 1e-3 * float(plain.abs().max())
    close(merged, want, "sample.py, merged", rel=1e-3)
    close(patched, want, "sample.py, <lora:> tag (patched)", rel=1e-3)


# ---------------------------------------------------------------- resume and the dtype rule
@pytest.mark.slow
def test_resume_of_a_lycoris_run_continues_exactly(kohya, tmp_path, tiny_single_file, shapes_dir):
    """LoHa with use_scalar and scale_weight_norms: the package scales its scalars, which the state holds too."""
    from support import run_job

    keys = dict(network_module="lycoris.kohya", network_args=["algo=loha", "use_scalar=True"], learning_rate=1e-2,
                scale_weight_norms=0.05)
    full = run_job(write_job(tmp_path / "a", tiny_single_file, shapes_dir, max_train_steps=5, **keys))
    first = run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, max_train_steps=3,
                              save_state_on_train_end=True, **keys))
    assert first.losses == full.losses[:3]
    resumed = run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, max_train_steps=5,
                                resume=str(first.state_dir), **keys))
    assert resumed.losses == full.losses[3:]
    from networks import load_network_file

    a, b = load_network_file(full.final_files[0])[0], load_network_file(resumed.final_files[0])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bf16_keeps_frozen_weights_in_bf16_and_the_network_in_fp32(kohya, tmp_path, tiny_single_file, shapes_dir):
    from support import run_job

    result = run_job(write_job(tmp_path, tiny_single_file, shapes_dir, network_module="lycoris.kohya",
                               network_args=["algo=lokr", "factor=4"], max_train_steps=1, mixed_precision="bf16",
                               save_precision="fp16"))
    assert next(result.model.unet.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in result.method.network.parameters()} == {torch.float32}
    from networks import load_network_file

    tensors, meta = load_network_file(result.final_files[0])
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    assert meta["ss_mixed_precision"] == "bf16"


# ---------------------------------------------------------------- every variant, without training
def _randomised(kohya, base, args: dict):
    """A copy of the base model with the package's network (random weights) applied, and that network."""
    from networks.lycoris_network import LycorisKohyaNetwork, LycorisSpec

    unet, text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    spec = LycorisSpec.from_args(4, 2, args)
    network = LycorisKohyaNetwork(spec, unet, text_encoder)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in network.lycoris.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    network.eval()
    return unet, text_encoder, network


VARIANTS = {  # beyond what the trained files above cover
    "loha tucker, DoRA": {"algo": "loha", "use_tucker": "True", "dora_wd": "True"},
    "lokr tucker": {"algo": "lokr", "factor": "4", "use_tucker": "True"},
    "lokr both factored": {"algo": "lokr", "factor": "8", "decompose_both": "True"},
    "lokr full matrices, DoRA": {"algo": "lokr", "full_matrix": "True", "dora_wd": "True"},
    "ia3 on every layer": {"algo": "ia3"},
    "dora on input": {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"},
    "locon tucker": {"algo": "locon", "use_tucker": "True", "conv_dim": "2"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reader_equals_the_package_forward_for_every_variant(variant, kohya, base, tmp_path):
    from networks import load_network_file, merge_weights, network_from_weights, save_network

    unet, text_encoder, network = _randomised(kohya, base, VARIANTS[variant])
    want = outputs(base, unet, text_encoder)
    path = tmp_path / "v.safetensors"
    save_network(path, network.kohya_state_dict(), {}, save_dtype="float")
    tensors, _ = load_network_file(path)
    fresh_unet, fresh_te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    patched = network_from_weights(tensors, fresh_unet, fresh_te, multiplier=1.0)
    patched.apply_to()
    for got, expected, part in zip(outputs(base, fresh_unet, fresh_te), want, ("text encoder", "U-Net")):
        close(got, expected, f"{variant}: {part}, patched")
    patched.set_multiplier(0.0)
    for got, expected in zip(outputs(base, fresh_unet, fresh_te), outputs(base)):
        assert torch.equal(got, expected)
    patched.restore()
    merge_weights(tensors, fresh_unet, fresh_te, 1.0)
    for got, expected, part in zip(outputs(base, fresh_unet, fresh_te), want, ("text encoder", "U-Net")):
        close(got, expected, f"{variant}: {part}, merged")


def test_network_weights_round_trip_and_mismatches_are_named(kohya, base, tmp_path):
    from networks import load_network_file, save_network
    from networks.lycoris_network import LycorisKohyaNetwork, LycorisSpec

    _, _, network = _randomised(kohya, base, {"algo": "loha"})
    path = tmp_path / "loha.safetensors"
    save_network(path, network.kohya_state_dict(), {}, save_dtype="float")
    tensors, _ = load_network_file(path)
    again = LycorisKohyaNetwork(LycorisSpec.from_args(4, 2, {"algo": "loha"}), copy.deepcopy(base.unet),
                                copy.deepcopy(base.text_encoder))
    again.load_kohya_state_dict(tensors, source=str(path))
    loaded, saved = again.kohya_state_dict(), network.kohya_state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())
    for dim, alpha, args, message in ((8, 2, {"algo": "loha"}, r"has shape .* set network_dim"),
                                      (4, 1, {"algo": "loha"}, r"alpha is 2 in the file but 1 in this network"),
                                      (4, 2, {"algo": "lokr"}, r"another algo")):
        other = LycorisKohyaNetwork(LycorisSpec.from_args(dim, alpha, args), copy.deepcopy(base.unet),
                                    copy.deepcopy(base.text_encoder))
        with pytest.raises(NetworkFileError, match=message):
            other.load_kohya_state_dict(tensors, source=str(path))
    unet_only = LycorisKohyaNetwork(LycorisSpec.from_args(4, 2, {"algo": "loha"}, train_text_encoder=False),
                                    copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder))
    with pytest.raises(NetworkFileError, match=r"not part of this network, e\.g\. lora_te_text_model_encoder"):
        unet_only.load_kohya_state_dict(tensors, source=str(path))


# ---------------------------------------------------------------- clear errors
def _load(tmp_path, tiny_single_file, shapes_dir, **keys):
    from library.config import load_job

    keys.setdefault("network_module", "lycoris.kohya")
    return load_job("train_network", config_path=str(write_job(tmp_path, tiny_single_file, shapes_dir, **keys)))


@pytest.mark.parametrize("args, message", [
    (["algo=lohaa"], r"algo = 'lohaa' is unknown; use one of lora, locon, loha, lokr, ia3"),
    (["algo=boft"], r"algo = 'boft' is a LyCORIS algorithm whose files sample.py and the tools cannot apply"),
    (["algo=loha", "factor=4"], r"factor has no effect with algo = loha \(it applies to algo = lokr\)"),
    (["algo=lokr", "factor=0"], r"factor = '0' must be -1 \(automatic\) or a positive whole number"),
    (["algo=loha", "use_tucker=maybe"], r"use_tucker = 'maybe' is not true or false"),
    (["algo=loha", "conv_dim=0"], r"conv_dim = '0' must be at least 1"),
    (["algo=loha", "colour=red"], r"unknown key 'colour' for lycoris.kohya; its keys are algo, preset, conv_dim"),
    (["algo=loha", "preset=attention"], r"preset = 'attention' is a networks.lora preset; LyCORIS' presets are full"),
    (["algo=loha", "preset=nope"], r"preset = 'nope' is unknown; use one of full, full-lin"),
    (["algo=loha", "block_dims=1,2"], r"block_dims is a setting of networks.lora"),
    (["algo=loha", "train_norm=True"], r"train_norm trains the norm layers"),
    (["algo=loha", "dropout=0.1"], r"dropout \(network_dropout\) acts only with bypass_mode=True"),
    (["algo=lora", "dora_wd=True", "bypass_mode=True"], r"dora_wd=True with bypass_mode=True"),
    (["algo=lora", "wd_on_output=False"], r"wd_on_output applies to DoRA only"),
    (["algo=ia3", "rank_dropout=0.1"], r"rank_dropout has no effect with algo = ia3"),
])
def test_bad_network_args_are_named_when_the_job_loads(args, message, tmp_path, tiny_single_file, shapes_dir):
    with pytest.raises(ConfigError, match=r"job\.toml: network_args: " + message):
        _load(tmp_path, tiny_single_file, shapes_dir, network_args=args)


def test_network_dropout_and_algo_without_lycoris_module(tmp_path, tiny_single_file, shapes_dir):
    with pytest.raises(ConfigError, match=r"dropout \(network_dropout\) acts only with bypass_mode"):
        _load(tmp_path, tiny_single_file, shapes_dir, network_args=["algo=loha"], network_dropout=0.1)
    assert _load(tmp_path, tiny_single_file, shapes_dir, network_args=["algo=loha"], network_dropout=0)
    with pytest.raises(ConfigError, match=r'algo = loha, a LyCORIS setting, but network_module = "networks.lora"; '
                                          r'set network_module = "lycoris.kohya"'):
        _load(tmp_path, tiny_single_file, shapes_dir, network_args=["algo=loha"], network_module="networks.lora")
    with pytest.raises(ConfigError, match=r"network_module.*lycoris.kohya"):
        _load(tmp_path, tiny_single_file, shapes_dir, network_module="lycoris.kohyaa")


def test_missing_package_is_named_before_the_model_loads(tmp_path, tiny_single_file, shapes_dir, monkeypatch):
    import train_network

    job = write_job(tmp_path, tiny_single_file, shapes_dir, network_module="lycoris.kohya",
                    network_args=["algo=loha"])
    monkeypatch.setitem(sys.modules, "lycoris", None)  # `import lycoris.kohya` now fails as if not installed
    monkeypatch.setitem(sys.modules, "lycoris.kohya", None)
    import library.training.loop as loop

    monkeypatch.setattr(loop, "load_sd1", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r'network_module = "lycoris.kohya" .* lycoris-lora package, which is not '
                                          r"installed: pip install lycoris-lora"):
        train_network.main(["--config", str(job)])


# ---------------------------------------------------------------- files of other tools, without the package
def _loha_file(tmp_path, **extra) -> tuple[dict, object]:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    g = torch.Generator().manual_seed(1)
    shapes = {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)}
    tensors = {f"{name}.{part}": torch.randn(shape, generator=g) for part, shape in shapes.items()}
    tensors.update({f"{name}.alpha": torch.tensor(1.0), **{f"{name}.{k}": v for k, v in extra.items()}})
    path = tmp_path / "loha.safetensors"
    save_file(tensors, str(path))
    return tensors, path


def test_hand_written_loha_matches_its_formula_and_bad_files_are_named(tiny_single_file, tmp_path):
    """ΔW = α/r · (w1a@w1b) ⊙ (w2a@w2b), merged at 0.5; incomplete and unreadable files are refused by name."""
    from library.models.loading import load_sd1
    from networks import load_network_file, merge_weights

    tensors, path = _loha_file(tmp_path)
    model = load_sd1(tiny_single_file)
    layer = model.unet.down_blocks[0].attentions[0].proj_in
    w0 = layer.weight.detach().clone()
    n = "lora_unet_down_blocks_0_attentions_0_proj_in"
    expected = w0 + 0.5 * (1.0 / 2) * ((tensors[f"{n}.hada_w1_a"] @ tensors[f"{n}.hada_w1_b"])
                                      * (tensors[f"{n}.hada_w2_a"] @ tensors[f"{n}.hada_w2_b"])).reshape(w0.shape)
    merge_weights(load_network_file(path)[0], model.unet, None, 0.5)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)

    incomplete = {k: v for k, v in tensors.items() if not k.endswith("hada_w2_b")}
    save_file(incomplete, str(tmp_path / "cut.safetensors"))
    with pytest.raises(NetworkFileError, match=r"module lora_unet_down_blocks_0_attentions_0_proj_in \(LoHa\) has no "
                                               r"hada_w2_b; the file is incomplete"):
        load_network_file(tmp_path / "cut.safetensors")
    save_file({**tensors, f"{n}.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(NetworkFileError, match=r"mixes tensors of LoHa and LoKr"):
        load_network_file(tmp_path / "mixed.safetensors")
    save_file({f"{n}.lokr_w1": torch.zeros(2, 2), f"{n}.lokr_t1": torch.zeros(2, 2, 1, 1),
               f"{n}.lokr_w2": torch.zeros(16, 16)}, str(tmp_path / "t1.safetensors"))
    with pytest.raises(NetworkFileError, match=r"lokr_t1\), which is not supported yet"):
        load_network_file(tmp_path / "t1.safetensors")
    wrong = {k: (v[:1] if k.endswith("hada_w1_b") else v) for k, v in tensors.items()}
    with pytest.raises(NetworkFileError, match=r"proj_in has hada_w1_a \[32, 2\], hada_w1_b \[1, 32\].*which do not "
                                               r"multiply together, which does not fit the model layer"):
        merge_weights(wrong, model.unet, None)
    wrong = {k: (v[:16] if k.endswith("hada_w2_a") else v) for k, v in tensors.items()}
    with pytest.raises(NetworkFileError, match=r"gives Hadamard factors of shapes \[32, 32\] and \[16, 32\]"):
        merge_weights(wrong, model.unet, None)


def test_tools_that_rewrite_lora_factors_refuse_lycoris_modules(tmp_path):
    from networks import merge, resize

    _, path = _loha_file(tmp_path)
    with pytest.raises(NetworkFileError, match=r"loha.safetensors: lora_unet_down_blocks_0_attentions_0_proj_in is a "
                                               r"LoHa module \(LyCORIS\), which has no lora_down/lora_up pair to "
                                               r"merge into another LoRA. Apply it with sample.py, or merge it into a "
                                               r"checkpoint"):
        merge.main(["--models", str(path), "--save_to", str(tmp_path / "one.safetensors")])
    with pytest.raises(NetworkFileError, match=r"LoHa module \(LyCORIS\), which has no lora_down/lora_up pair to "
                                               r"resize"):
        resize.main(["--model", str(path), "--save_to", str(tmp_path / "small.safetensors"), "--new_rank", "1"])
    assert not (tmp_path / "one.safetensors").exists() and not (tmp_path / "small.safetensors").exists()


@pytest.mark.slow
def test_dreambooth_lora_mode_trains_a_lycoris_network(kohya, tmp_path, tiny_single_file, shapes_dir):
    """train_dreambooth.py shares the network method: class images made with the network off, a LoKr file."""
    import train_dreambooth
    from networks import load_network_file

    classes = tmp_path / "class_circle"
    job = write_job_file(tmp_path, {
        "pretrained_model_name_or_path": str(tiny_single_file), "output_dir": str(tmp_path / "out"),
        "output_name": "db", "network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=4"],
        "network_dim": 4, "network_alpha": 4.0, "learning_rate": 1e-2, "max_train_steps": 2, "seed": 7,
        "train_batch_size": 1, "cache_latents": True, "save_precision": "float", "class_prompt": "a circle",
        "num_class_images": 2, "class_image_steps": 1, "class_image_cfg_scale": 1.0},
        [{"image_dir": str(shapes_dir), "class_tokens": "sks circle"}, {"image_dir": str(classes), "is_reg": True}])
    result = train_dreambooth.main(["--config", str(job)])
    assert len(list(classes.glob("class_*.png"))) == 2
    tensors, meta = load_network_file(result.final_files[0])
    assert {k.split(".", 1)[1] for k in tensors} <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_dreambooth_mode"] == "lora"
    assert result.method.network._applied  # patched again after the class images
