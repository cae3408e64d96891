"""SD1.x models: architecture from tensor shapes, LDM <-> diffusers keys, loading/saving, tokenizer, tiny model."""
