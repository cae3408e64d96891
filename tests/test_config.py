"""Job files: every mistake gets a message naming the file, line/key and fix; the command line wins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from library.config import load_job, parse_cli, schema
from library.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def job_file(tmp_path: Path, body: str) -> Path:
    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    (images / "a.png").write_bytes(b"")
    path = tmp_path / "job.toml"
    path.write_text(f'pretrained_model_name_or_path = "model.safetensors"\n{body}'
                    f'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n')
    return path


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = job_file(tmp_path, "network_dim = 4\nlerning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"job\.toml line 3: unknown key 'lerning_rate'\. Did you mean 'learning_rate'\?"):
        load_job("train_network", config_path=str(path))


def test_wrong_type_names_expected_type(tmp_path):
    path = job_file(tmp_path, 'network_dim = "four"\n')
    with pytest.raises(ConfigError, match=r"job\.toml line 2: 'network_dim' must be an integer, got str 'four'"):
        load_job("train_network", config_path=str(path))


def test_choice_and_range_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'mixed_precision' = 'fp8' is not one of: no, fp16, bf16"):
        load_job("train_network", config_path=str(job_file(tmp_path, 'mixed_precision = "fp8"\n')))
    with pytest.raises(ConfigError, match=r"'clip_skip' = 0 must be at least 1"):
        load_job("train_network", config_path=str(job_file(tmp_path, "clip_skip = 0\n")))


def test_missing_required_key(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('train_data_dir = "x"\n')
    with pytest.raises(ConfigError, match=r"required key 'pretrained_model_name_or_path' is missing"):
        load_job("train_network", config_path=str(path))


def test_toml_syntax_error_has_line(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nlearning_rate = 1e-4\nnetwork_dim = = 4\n')
    with pytest.raises(ConfigError, match=r"job\.toml: TOML syntax error: .*line 3"):
        load_job("train_network", config_path=str(path))


def test_unsupported_sd_scripts_key_says_why(tmp_path):
    with pytest.raises(ConfigError, match=r"'v2' is not supported by pentadactyl: SD2.x"):
        load_job("train_network", config_path=str(job_file(tmp_path, "v2 = true\n")))


def test_cli_overrides_toml_and_sections_are_flattened(tmp_path):
    path = job_file(tmp_path, "[training_arguments]\nlearning_rate = 1e-4\nmax_train_steps = 10\n"
                              "[additional_network_arguments]\nnetwork_dim = 8\n")
    job = load_job("train_network", ["--config", str(path), "--learning_rate", "5e-5", "--network_dim=16",
                                     "--gradient_checkpointing"])
    assert job.learning_rate == 5e-5 and job.network_dim == 16 and job.max_train_steps == 10
    assert job.gradient_checkpointing is True
    assert job.output_name == "job"  # defaults to the job file's name
    with pytest.raises(AttributeError, match="read-only"):
        job.learning_rate = 1.0


def test_network_keys_are_checked_against_each_other_when_the_job_loads(tmp_path):
    with pytest.raises(ConfigError, match=r'job\.toml: network_module = "networks\.locon" adapts the convolution '
                                          r'layers too, but network_args has no conv_dim; add network_args = '):
        load_job("train_network", config_path=str(job_file(tmp_path, 'network_module = "networks.locon"\n')))
    locon = load_job("train_network", config_path=str(job_file(
        tmp_path, 'network_module = "networks.locon"\nnetwork_args = ["conv_dim=8", "conv_alpha=4"]\n')))
    assert locon.network_args == ["conv_dim=8", "conv_alpha=4"]
    with pytest.raises(ConfigError, match=r"job\.toml: network_args: 'conv_dim' is not of the form name=value"):
        load_job("train_network", config_path=str(job_file(tmp_path, 'network_args = ["conv_dim"]\n')))
    with pytest.raises(ConfigError, match="network_train_unet_only and network_train_text_encoder_only exclude each"):
        load_job("train_network", config_path=str(job_file(
            tmp_path, "network_train_unet_only = true\nnetwork_train_text_encoder_only = true\n")))


def test_sample_prompts_have_no_length_limit_unless_asked(tmp_path):
    path = tmp_path / "sample.toml"
    path.write_text('pretrained_model_name_or_path = "m.safetensors"\nprompt = "a hand"\n')
    assert load_job("sample", config_path=str(path)).max_token_length is None
    assert load_job("sample", ["--config", str(path), "--max_token_length", "150"]).max_token_length == 150
    assert load_job("train_network", config_path=str(job_file(tmp_path, ""))).max_token_length == 75


def test_cli_errors():
    fields = schema("train_network").fields
    with pytest.raises(ConfigError, match=r"unknown option --netwrk_dim\. Did you mean 'network_dim'\?"):
        parse_cli(["--netwrk_dim", "4"], fields)
    with pytest.raises(ConfigError, match=r"--max_train_steps: 'ten' is not an integer"):
        parse_cli(["--max_train_steps", "ten"], fields)


def test_dataset_config_and_inline_datasets_exclude_each_other(tmp_path):
    other = tmp_path / "data.toml"
    other.write_text("[[datasets]]\n")
    path = job_file(tmp_path, f'dataset_config = "{other}"\n')
    with pytest.raises(ConfigError, match="either inline .* or with dataset_config"):
        load_job("train_network", config_path=str(path))


@pytest.mark.slow
def test_print_config_shows_resolved_job_and_exits(tmp_path):
    path = job_file(tmp_path, "network_dim = 12\n")
    proc = subprocess.run([sys.executable, str(REPO / "train_network.py"), "--config", str(path), "--print_config",
                           "--seed", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "network_dim = 12" in proc.stdout and "seed = 3" in proc.stdout and "learning_rate = 0.0001" in proc.stdout


@pytest.mark.slow
def test_bad_job_in_script_prints_message_without_traceback(tmp_path):
    path = job_file(tmp_path, "network_dimm = 4\n")
    proc = subprocess.run([sys.executable, str(REPO / "train_network.py"), "--config", str(path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Did you mean 'network_dim'" in proc.stderr and "Traceback" not in proc.stderr


def test_job_types_list_every_key_of_every_script_with_its_type():
    from library import job_types
    from tools.job_types import CLASS_NAMES, job_types_source

    assert (REPO / "library" / "job_types.py").read_text() == job_types_source(), \
        "library/job_types.py is stale: python tools/job_types.py > library/job_types.py"
    for script, name in CLASS_NAMES.items():
        declared = {}
        for klass in reversed(getattr(job_types, name).__mro__):
            declared.update(getattr(klass, "__annotations__", {}))
        assert set(schema(script).fields) <= set(declared), script
    assert job_types.NetworkJob.__annotations__["network_dim"] == "int"
    assert job_types.TrainingJob.__annotations__["ema_decay"] == "float | None"
    assert job_types.SampleJob.__annotations__["max_token_length"] == "int | None"


def test_sd_scripts_spellings_are_accepted(tmp_path):
    """What kohya_ss's GUI and the Colab notebooks write: false-valued flags of features we lack, sizes and lists
    as text."""
    path = job_file(tmp_path, 'v2 = false\nv_parameterization = false\nfull_fp16 = false\nlowram = false\n'
                              'scale_weight_norms = 0\nsdxl = false\nvae = ""\nnetwork_args = "conv_dim=4"\n'
                              'resolution = "512,768"\n')
    job = load_job("train_network", config_path=str(path))
    assert job.network_args == ["conv_dim=4"] and job.datasets[0].resolution == (512, 768)
    for text, size in (('"640"', (640, 640)), ('"640x448"', (640, 448)), ("[448, 640]", (448, 640))):
        job = load_job("train_network", config_path=str(job_file(tmp_path, f"resolution = {text}\n")))
        assert job.datasets[0].resolution == size, text
    assert not {"v2", "vae", "full_fp16"} & set(job.given)


def test_every_bad_key_of_a_file_is_reported_in_one_run(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('pretrained_model_name_or_path = "m.safetensors"\nv2 = true\nlerning_rate = 1e-4\n'
                    'network_dim = "four"\nmixed_precision = "fp8"\n'
                    '[[datasets]]\nresolution = "big"\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeat = 2\n')
    with pytest.raises(ConfigError) as caught:
        load_job("train_network", config_path=str(path))
    lines = str(caught.value).splitlines()
    assert lines[0] == "6 problems; fix them all, then run again:"
    assert "line 2: 'v2' is not supported by pentadactyl" in lines[1]
    assert "line 3: unknown key 'lerning_rate'. Did you mean 'learning_rate'?" in lines[2]
    assert "line 4: 'network_dim' must be an integer" in lines[3]
    assert "line 5: 'mixed_precision' = 'fp8' is not one of" in lines[4]
    assert "[[datasets]] #1: 'resolution' must be an integer or a list of two integers" in lines[5]
    assert "[[datasets.subsets]] #1: unknown key 'num_repeat'. Did you mean 'num_repeats'?" in lines[6]


def test_no_key_is_both_a_job_key_and_unsupported():
    from library.config import UNSUPPORTED
    from library.scripts import SCRIPTS

    assert not {name: set(UNSUPPORTED) & set(s.fields) for name, s in SCRIPTS.items() if set(UNSUPPORTED) & set(s.fields)}
