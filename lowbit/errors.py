"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class LowbitError(Exception):
    """Base for every error caused by bad input (paths, checkpoints, parameters, requests)."""


class ModelLoadError(LowbitError):
    """A model path, checkpoint or config that cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """A config.json naming an architecture we have no implementation for."""


class EngineDeadError(LowbitError):
    """The engine can run no more steps (a tensor-parallel rank died): servers answer 503."""


class QuantizationError(LowbitError):
    """Impossible quantization parameters (bits, group size that does not divide a layer...)."""
