"""pentadactyl: a training toolkit for Stable Diffusion 1.x (LoRA/LoCon, textual inversion, DreamBooth)."""

__version__ = "0.1.0"
