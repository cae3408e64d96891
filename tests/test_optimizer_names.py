"""sd-scripts' optimizer names and arguments, the Adafactor schedule, scale_weight_norms and dynamo_backend."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from library.errors import ConfigError
from library.training.optimizers import (
    apply_max_norm, build_optimizer, build_scheduler, check_optimizer_job, optimizer_class, parse_optimizer_args,
)

# name as a user writes it -> (module prefix, class name) of what it builds; None: a package the test skips without
NAMES = [
    ("Adafactor", "transformers", "Adafactor", None),
    ("adafactor", "transformers", "Adafactor", None),
    ("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    ("PRODIGY", "prodigyopt", "Prodigy", "prodigyopt"),
    ("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    ("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    ("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
    ("dadaptadam", "dadaptation", "DAdaptAdam", "dadaptation"),
    ("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
    ("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
    ("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    ("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
    ("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
    ("PagedAdamW", "bitsandbytes", "PagedAdamW", "bitsandbytes"),
    ("PagedAdamW8bit", "bitsandbytes", "PagedAdamW8bit", "bitsandbytes"),
    ("PagedAdamW32bit", "bitsandbytes", "PagedAdamW32bit", "bitsandbytes"),
    ("PagedLion8bit", "bitsandbytes", "PagedLion8bit", "bitsandbytes"),
    ("SGDNesterov8bit", "bitsandbytes", "SGD8bit", "bitsandbytes"),
    ("RAdam", "torch.optim", "RAdam", None),  # sd-scripts' fallback: a bare name of torch.optim
]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name,module,class_name,package", NAMES)
def test_each_name_builds_its_class_and_steps(name, module, class_name, package):
    if package:
        pytest.importorskip(package)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # 8-bit states need tensors of a few thousand values
    before = weight.detach().clone()
    args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"] if class_name == "Adafactor" else None
    lr = 1.0 if package in ("prodigyopt", "dadaptation") else 1e-2  # these estimate the step; lr scales it
    optimizer = build_optimizer(name, [{"params": [weight], "lr": lr}], 1e-3, args)
    assert type(optimizer).__name__ == class_name and type(optimizer).__module__.startswith(module)
    for _ in range(2):  # D-Adaptation's first step may be a pure estimate
        (weight ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(weight.detach(), before)
    if name.startswith("SGDNesterov"):  # as sd-scripts: Nesterov, momentum 0.9 unless given
        assert optimizer_class(name, None)[1] == {"nesterov": True, "momentum": 0.9}


def test_optimizer_args_are_typed_as_literals_and_reach_the_optimizer():
    kwargs = parse_optimizer_args(["decouple=True", "weight_decay=0.01", "d_coef=2", "betas=0.9,0.99",
                                   "betas2=(0.9, 0.999)", "safeguard_warmup=False", "name=foo",
                                   "code=__import__('os').getcwd()"])
    assert kwargs == {"decouple": True, "weight_decay": 0.01, "d_coef": 2, "betas": (0.9, 0.99),
                      "betas2": (0.9, 0.999), "safeguard_warmup": False, "name": "foo",
                      "code": "__import__('os').getcwd()"}  # not a literal: kept as text, never run
    assert type(kwargs["d_coef"]) is int and type(kwargs["weight_decay"]) is float

    pytest.importorskip("prodigyopt")
    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer("Prodigy", [{"params": [weight], "lr": 1.0}], 1.0,
                                ["decouple=True", "weight_decay=0.01", "d_coef=2", "betas=0.9,0.99",
                                 "use_bias_correction=True", "safeguard_warmup=True"])
    group = optimizer.param_groups[0]
    assert (group["decouple"], group["weight_decay"], group["d_coef"], group["betas"]) == (True, 0.01, 2, (0.9, 0.99))
    assert group["use_bias_correction"] and group["safeguard_warmup"]
    with pytest.raises(ConfigError, match=r"optimizer_args: Prodigy takes no argument 'd_cof'. Did you mean 'd_coef'"):
        optimizer_class("Prodigy", ["d_cof=2"])


def test_missing_packages_name_the_key_and_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt raises ImportError
    with pytest.raises(ConfigError, match=r'optimizer_type = "Prodigy" needs the prodigyopt package.*'
                                          r'Install it with: pip install prodigyopt$'):
        optimizer_class("Prodigy", None)
    monkeypatch.setitem(sys.modules, "dadaptation", None)
    monkeypatch.setitem(sys.modules, "dadaptation.experimental", None)
    for name in ("DAdaptAdam", "DAdaptation", "dadaptlion"):
        with pytest.raises(ConfigError, match=rf'optimizer_type = "{name}" needs the dadaptation package.*'
                                              r'pip install dadaptation$'):
            optimizer_class(name, None)
    with pytest.raises(ConfigError, match=r"\"DAdaptAdamm\" is unknown. Did you mean 'DAdaptAdam'\?"):
        optimizer_class("DAdaptAdamm", None)


def test_adafactor_relative_step_takes_its_own_rate_and_the_schedule_reports_it():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    other = torch.nn.Parameter(torch.randn(8))
    groups = [{"params": [weight], "lr": 5e-4, "name": "unet"}, {"params": [other], "lr": 5e-4, "name": "te"}]
    optimizer = build_optimizer("Adafactor", groups, 1e-3, None)  # sd-scripts' default: relative_step=True
    assert optimizer.defaults["relative_step"] and optimizer.defaults["lr"] is None
    assert optimizer.defaults["scale_parameter"] and not optimizer.defaults["warmup_init"]
    assert groups[0]["lr"] == 5e-4  # the caller's groups are not changed
    scheduler = build_scheduler("constant", optimizer, 0, 10, initial_lr=1e-3)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == [1e-3, 1e-3]  # learning_rate before the first step, as sd-scripts logs it
    for step in (1, 2):
        (weight ** 2).sum().add((other ** 2).sum()).backward()
        before = [weight.detach().clone(), other.detach().clone()]
        optimizer.step()
        scheduler.step()
        assert not torch.equal(weight.detach(), before[0])
        # Adafactor's relative step: min(1e-2, 1/√step) × max(1e-3, RMS of the weights it stepped from)
        expected = [min(1e-2, 1 / math.sqrt(step)) * max(1e-3, b.pow(2).mean().sqrt().item()) for b in before]
        assert [float(lr) for lr in scheduler.get_last_lr()] == pytest.approx(expected, rel=1e-5)
        optimizer.zero_grad(set_to_none=True)
    # lr_scheduler = "adafactor" is the same schedule; it needs the relative step
    assert type(build_scheduler("adafactor", optimizer, 0, 10)).__name__ == "AdafactorSchedule"
    with pytest.raises(ConfigError, match='lr_scheduler = "adafactor" needs optimizer_type = "Adafactor"'):
        build_scheduler("adafactor", torch.optim.SGD([weight], lr=1.0), 0, 10)


def job(**keys):
    base = dict(source="job.toml", optimizer_type="AdamW", optimizer_args=None, lr_scheduler="constant",
                lr_warmup_steps=0, learning_rate=1e-4, unet_lr=None, text_encoder_lr=None)
    return SimpleNamespace(**{**base, **keys})


def test_inconsistent_optimizer_and_schedule_combinations_are_refused():
    for keys, message in [
        (dict(optimizer_type="Adafactor", lr_scheduler="cosine"),
         r'relative_step=True \(its default\).*lr_scheduler = "cosine" would have no effect.*'
         r'Set lr_scheduler = "adafactor".*"relative_step=False"'),
        (dict(optimizer_type="Adafactor", lr_warmup_steps=10), r"lr_warmup_steps = 10 would have no effect"),
        (dict(optimizer_type="Adafactor", unet_lr=1e-4), r"so unet_lr would have no effect"),
        (dict(optimizer_type="AdamW", lr_scheduler="adafactor"),
         r'lr_scheduler = "adafactor" reports the step size that Adafactor computes'),
        (dict(optimizer_type="Adafactor", optimizer_args=["relative_step=False"], lr_scheduler="adafactor"),
         r'lr_scheduler = "adafactor" reports'),
        (dict(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "warmup_init=True"]),
         r"warmup_init=True warms up its relative step, but relative_step=False switches that off"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_optimizer_job(job(**keys))
    # what works: the relative step with the constant or adafactor schedule (and frozen parts), or a manual rate
    assert check_optimizer_job(job(optimizer_type="Adafactor", lr_scheduler="adafactor", text_encoder_lr=0.0)) == []
    assert check_optimizer_job(job(optimizer_type="Adafactor", lr_scheduler="constant_with_warmup",
                                   lr_warmup_steps=10, unet_lr=1e-4, optimizer_args=[
                                       "scale_parameter=False", "relative_step=False", "warmup_init=False"])) == []


def test_learning_rate_free_optimizers_warn_about_a_small_rate():
    pytest.importorskip("prodigyopt")
    warnings = check_optimizer_job(job(optimizer_type="Prodigy", learning_rate=1e-4))
    assert len(warnings) == 1 and "learning_rate = 1.0 is usual" in warnings[0]
    assert check_optimizer_job(job(optimizer_type="Prodigy", learning_rate=1.0)) == []
    assert check_optimizer_job(job(optimizer_type="Prodigy", learning_rate=1e-4, unet_lr=1.0,
                                   text_encoder_lr=1.0)) == []
    # Prodigy and most of D-Adaptation stop at the first step when the groups' rates differ: refused before
    with pytest.raises(ConfigError, match=r"Prodigy takes one learning rate .* unet_lr = 1 and text_encoder_lr = 0.5 "
                                          r"differ"):
        check_optimizer_job(job(optimizer_type="Prodigy", learning_rate=1.0, text_encoder_lr=0.5))
    assert check_optimizer_job(job(optimizer_type="Prodigy", learning_rate=1.0, text_encoder_lr=0.0)) == []
    assert check_optimizer_job(job(optimizer_type="Prodigy", learning_rate=1.0, text_encoder_lr=0.5,
                                   network_train_unet_only=True)) == []
    weight, other = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer("Prodigy", [{"params": [weight], "lr": 1.0}, {"params": [other], "lr": 0.5}], 1.0,
                                None)
    (weight.sum() + other.sum()).backward()
    with pytest.raises(RuntimeError, match="different lr values"):  # what the check spares a run from
        optimizer.step()


# ----------------------------------------------------------------------------------- scale_weight_norms


def locon(base: torch.nn.Module, rank: int, alpha: float):
    from networks.locon import LoConModule
    from networks.targets import CONV, LINEAR, Target

    kind = CONV if isinstance(base, torch.nn.Conv2d) else LINEAR
    return LoConModule(Target("lora_unet_x", "x", "unet", "unet_attention", kind, None, rank, alpha), base)


def test_scale_weight_norms_scales_modules_above_the_max_exactly_to_it():
    big = locon(torch.nn.Linear(6, 5, bias=False), rank=2, alpha=1.0)  # scale 1/2
    with torch.no_grad():
        big.lora_down.weight.zero_()
        big.lora_down.weight[0, 0], big.lora_down.weight[1, 1] = 1.0, 1.0
        big.lora_up.weight.zero_()
        big.lora_up.weight[0, 0], big.lora_up.weight[1, 1] = 3.0, 4.0
    # up·down has 3 and 4 on its diagonal: Frobenius norm 5, times alpha/rank = 2.5
    small = locon(torch.nn.Linear(6, 5, bias=False), rank=2, alpha=2.0)  # scale 1
    with torch.no_grad():
        small.lora_down.weight.zero_()
        small.lora_down.weight[0, 2] = 1.0
        small.lora_up.weight.zero_()
        small.lora_up.weight[3, 0] = 0.5  # norm 0.5
    torch.manual_seed(0)
    conv = locon(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), rank=2, alpha=1.0)
    torch.nn.init.normal_(conv.lora_up.weight, std=5.0)
    conv_norm = (torch.linalg.matrix_norm(conv.lora_up.weight.flatten(1) @ conv.lora_down.weight.flatten(1))
                 * 0.5).item()
    assert conv_norm > 1.0
    small_up, small_down = small.lora_up.weight.detach().clone(), small.lora_down.weight.detach().clone()
    big_up, big_down = big.lora_up.weight.detach().clone(), big.lora_down.weight.detach().clone()

    scaled, mean, largest = apply_max_norm([big, small, conv], 1.0)

    assert scaled == 2
    assert big.delta_weight().norm().item() == pytest.approx(1.0, rel=1e-6)
    assert conv.delta_weight().norm().item() == pytest.approx(1.0, rel=1e-5)
    factor = math.sqrt(1.0 / 2.5)  # up and down each by √(max / norm)
    torch.testing.assert_close(big.lora_up.weight.detach(), big_up * factor)
    torch.testing.assert_close(big.lora_down.weight.detach(), big_down * factor)
    assert torch.equal(small.lora_up.weight, small_up) and torch.equal(small.lora_down.weight, small_down)
    assert mean == pytest.approx((1.0 + 0.5 + 1.0) / 3, rel=1e-5) and largest == pytest.approx(1.0, rel=1e-5)
    # again: nothing is above the max any more
    assert apply_max_norm([big, small, conv], 1.0)[0] == 0
    assert apply_max_norm([], 1.0) == (0, 0.0, 0.0)


def test_new_keys_are_accepted_and_dynamo_backends_other_than_no_are_refused(tmp_path):
    from support import write_job_file

    from library.config import load_job
    from library.training.runtime import check_dynamo_backend

    images = tmp_path / "img"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    for value in ("no", "NO"):
        path = write_job_file(tmp_path, {"pretrained_model_name_or_path": "model.safetensors", "dynamo_backend": value,
                                         "scale_weight_norms": 1.0, "optimizer_type": "Adafactor",
                                         "lr_scheduler": "adafactor"}, [{"image_dir": str(images)}])
        loaded = load_job("train_network", config_path=str(path))
        assert (loaded.dynamo_backend, loaded.scale_weight_norms, loaded.lr_scheduler) == (value, 1.0, "adafactor")
        check_dynamo_backend(loaded)
    assert load_job("train_network", config_path=str(path), overrides={"dynamo_backend": "no"}).dynamo_backend == "no"
    with pytest.raises(ConfigError, match=r'dynamo_backend = "inductor": pentadactyl does not torch.compile the '
                                          r'U-Net.*Set dynamo_backend = "no" or remove it'):
        check_dynamo_backend(SimpleNamespace(source="job.toml", dynamo_backend="inductor"))


def test_training_with_adafactor_and_scale_weight_norms_logs_the_norms(tmp_path, tiny_single_file, shapes_dir,
                                                                       monkeypatch):
    from support import run_job, write_job

    from library.training import loop

    scalars: dict[str, list[float]] = {}

    class Recorder:
        def add_scalar(self, tag, value, step):
            scalars.setdefault(tag, []).append(float(value))

        def close(self):
            pass

    monkeypatch.setattr(loop, "tensorboard_writer", lambda job: Recorder())
    limit = 1e-6  # below what the first steps reach (Adafactor starts zero-initialised ups slowly): all are scaled
    result = run_job(write_job(tmp_path, tiny_single_file, shapes_dir, max_train_steps=3, optimizer_type="Adafactor",
                               scale_weight_norms=limit, dynamo_backend="no", network_train_unet_only=True))
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    norms = [m.delta_weight().norm().item() for m in result.method.network.modules_of()]
    assert max(norms) <= limit * (1 + 1e-4)
    assert scalars["max_norm/keys_scaled"][-1] > 0 and len(scalars["max_norm/keys_scaled"]) == 3
    assert scalars["max_norm/max_key_norm"][-1] == pytest.approx(limit, rel=1e-4)
    assert 0 < scalars["max_norm/average_key_norm"][-1] <= limit * (1 + 1e-4)
    # the logged rate is Adafactor's own relative step (≤ 1e-2 × the weights' RMS), not learning_rate
    assert scalars["lr/unet"][-1] != pytest.approx(2e-3)
    with pytest.raises(ConfigError, match=r'dynamo_backend = "inductor"'):
        run_job(write_job(tmp_path / "b", tiny_single_file, shapes_dir, dynamo_backend="inductor"))


def test_scale_weight_norms_without_a_lora_network_is_refused_before_the_model_loads():
    from library.training import loop

    full = SimpleNamespace(**vars(job()), mixed_precision="no", dynamo_backend="no", scale_weight_norms=1.0)
    with pytest.raises(ConfigError, match=r"scale_weight_norms limits the norms of LoRA modules, but this job trains "
                                          r"no LoRA network"):
        loop.train(full, SimpleNamespace(saves_network=False))  # DreamBooth's full mode
