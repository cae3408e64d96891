"""The one training loop, its methods (LoRA, textual inversion, DreamBooth), optimizers and state."""
