"""Sampler names users know (sd-scripts, A1111, ComfyUI) → diffusers schedulers configured for SD1.

Every sampler starts from SD1's training schedule (`SD1_SCHEDULER_CONFIG`: scaled-linear betas
0.00085…0.012, 1000 steps, epsilon prediction, steps_offset 1) plus the options that make it the
sampler of that name. Names are matched ignoring case, spaces, '_' and '-' ("DPM++ 2M Karras",
"dpm++_2m_karras" and "dpmpp_2m_karras" are one sampler); a `k_` prefix (sd-scripts) is accepted.
An unknown name is a ConfigError listing the valid ones: never a silent fallback.

Notes on fidelity to A1111 (k-diffusion): DDIM, Euler, Euler a, Heun, DPM2 (a), DPM++ 2M (SDE) and
their Karras forms use the same sigma/timestep discretisations, so images match in structure;
bit-exact equality is not expected. sd-scripts' `dpmsolver` (DPM-Solver, not ++) and `dpmsingle`
have no A1111 counterpart; their PNGs name them as they are.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from library.errors import ConfigError
from library.models.architecture import SD1_SCHEDULER_CONFIG
from library.schema import did_you_mean

KARRAS = {"use_karras_sigmas": True}


@dataclass(frozen=True)
class SamplerDef:
    name: str  # canonical name (sd-scripts' where it has one)
    a1111_name: str | None  # what A1111 writes as "Sampler:"; None when A1111 has no such sampler
    scheduler_class: str  # a diffusers class name
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    requires: str | None = None  # an optional Python package the diffusers class needs

    @property
    def infotext_name(self) -> str:
        return self.a1111_name or self.name

    @property
    def ancestral(self) -> bool:
        return "Ancestral" in self.scheduler_class or "sde" in str(self.options.get("algorithm_type", "")) or \
            self.scheduler_class == "DPMSolverSDEScheduler"


SAMPLERS: tuple[SamplerDef, ...] = (
    SamplerDef("ddim", "DDIM", "DDIMScheduler"),
    SamplerDef("ddpm", "DDPM", "DDPMScheduler"),
    SamplerDef("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms",)),
    SamplerDef("lms", "LMS", "LMSDiscreteScheduler", requires="scipy"),
    SamplerDef("lms_karras", "LMS Karras", "LMSDiscreteScheduler", KARRAS, requires="scipy"),
    SamplerDef("euler", "Euler", "EulerDiscreteScheduler"),
    SamplerDef("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", aliases=("euler_ancestral",)),
    SamplerDef("heun", "Heun", "HeunDiscreteScheduler"),
    SamplerDef("dpm_2", "DPM2", "KDPM2DiscreteScheduler", aliases=("dpm2",)),
    SamplerDef("dpm_2_karras", "DPM2 Karras", "KDPM2DiscreteScheduler", KARRAS, aliases=("dpm2_karras",)),
    SamplerDef("dpm_2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("dpm2_a", "dpm_2_ancestral")),
    SamplerDef("dpm_2_a_karras", "DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", KARRAS,
               aliases=("dpm2_a_karras",)),
    SamplerDef("dpmsolver++", "DPM++ 2M", "DPMSolverMultistepScheduler",
               {"algorithm_type": "dpmsolver++", "solver_order": 2}, aliases=("dpmpp_2m",)),
    SamplerDef("dpm++_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
               {"algorithm_type": "dpmsolver++", "solver_order": 2, **KARRAS}, aliases=("dpmpp_2m_karras",)),
    SamplerDef("dpm++_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
               {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, aliases=("dpmpp_2m_sde",)),
    SamplerDef("dpm++_2m_sde_karras", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
               {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **KARRAS}, aliases=("dpmpp_2m_sde_karras",)),
    SamplerDef("dpm++_sde", "DPM++ SDE", "DPMSolverSDEScheduler", aliases=("dpmpp_sde",), requires="torchsde"),
    SamplerDef("dpm++_sde_karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler", KARRAS,
               aliases=("dpmpp_sde_karras",), requires="torchsde"),
    SamplerDef("dpmsolver", None, "DPMSolverMultistepScheduler",
               {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}),
    SamplerDef("dpmsingle", None, "DPMSolverSinglestepScheduler", {"lower_order_final": True}),
    SamplerDef("unipc", "UniPC", "UniPCMultistepScheduler", aliases=("uni_pc",)),
    SamplerDef("lcm", "LCM", "LCMScheduler"),
)

DEFAULT_SAMPLER = "ddim"


def normalize_sampler_name(name: str) -> str:
    """Lower case, separators removed, an sd-scripts `k_` prefix dropped: 'DPM++ 2M Karras' → 'dpm++2mkarras'."""
    text = name.strip().lower()
    if text.startswith("k_"):
        text = text[2:]
    return re.sub(r"[\s_\-]+", "", text)


def _lookup_table() -> dict[str, SamplerDef]:
    table: dict[str, SamplerDef] = {}
    for sampler in SAMPLERS:
        for label in (sampler.name, sampler.a1111_name, *sampler.aliases):
            if label:
                key = normalize_sampler_name(label)
                assert table.get(key, sampler) is sampler, f"sampler name {label} is ambiguous"
                table[key] = sampler
    return table


_BY_NAME = _lookup_table()


def sampler_names() -> list[str]:
    """Every accepted name, canonical ones first (for error messages and documentation)."""
    names = [s.name for s in SAMPLERS]
    names += [s.a1111_name for s in SAMPLERS if s.a1111_name]
    return names


def resolve_sampler(name: str, where: str = "sampler") -> SamplerDef:
    """The sampler called `name`; ConfigError listing the valid names when there is none."""
    found = _BY_NAME.get(normalize_sampler_name(name))
    if found is None:
        raise ConfigError(
            f"{where}: unknown sampler '{name}'.{did_you_mean(name, sampler_names())} Valid samplers: "
            f"{', '.join(s.name for s in SAMPLERS)}; A1111 names: "
            f"{', '.join(repr(s.a1111_name) for s in SAMPLERS if s.a1111_name)}.")
    return found


def make_scheduler(name: str | SamplerDef, where: str = "sampler"):
    """A fresh diffusers scheduler for the named sampler, configured for SD1."""
    import diffusers

    sampler = name if isinstance(name, SamplerDef) else resolve_sampler(name, where)
    if sampler.requires and importlib.util.find_spec(sampler.requires) is None:
        raise ConfigError(f"{where}: sampler '{sampler.infotext_name}' needs the Python package "
                          f"'{sampler.requires}', which is not installed (pip install {sampler.requires}), "
                          "or choose another sampler.")
    cls = getattr(diffusers, sampler.scheduler_class)
    accepted = set(inspect.signature(inspect.unwrap(cls.__init__)).parameters)
    config = {**SD1_SCHEDULER_CONFIG, **sampler.options}
    if "kwargs" not in accepted:  # keep only the keys this class knows (no "unused config" warnings)
        config = {k: v for k, v in config.items() if k in accepted}
    return cls(**config)


def step_takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters
