"""Errors that mean "the user gave us something we cannot use".

Scripts catch `PentadactylError` at the top level and print its message without a traceback:
the message itself must name the file / key and say what would fix it.
"""


class PentadactylError(Exception):
    """Base class for every error caused by user input (files, job keys, folders)."""


class ConfigError(PentadactylError):
    """A job or dataset TOML problem: unknown key, wrong type, missing value, syntax error."""


class ModelLoadError(PentadactylError):
    """A checkpoint that is missing, truncated, unsafe, or not an SD1.x model."""


class DatasetError(PentadactylError):
    """An image folder, caption or bucket setting that cannot be used."""


class NetworkFileError(PentadactylError):
    """A LoRA/LoCon file that cannot be read or does not fit the model."""
