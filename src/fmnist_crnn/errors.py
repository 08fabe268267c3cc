"""The errors every layer raises. A stage reports them as one line and exit code 2.

This module imports nothing of the package, so a stage script can catch them without importing
torch, MLflow or the rest of the library first.
"""


class ProjectError(Exception):
    """Base of the errors that mean bad input or an unusable environment, not a bug."""


class ConfigError(ProjectError, ValueError):
    """A parameter is unknown, missing, of the wrong type or out of range."""


class DataError(ProjectError, RuntimeError):
    """The dataset cannot be obtained or read; the message names the file and the source."""


class CheckpointError(ProjectError, RuntimeError):
    """A model file cannot be read or does not match the code's architecture."""


class TrainingError(ProjectError, RuntimeError):
    """Training cannot go on (for example the loss is no longer finite)."""


class TrackingError(ProjectError, RuntimeError):
    """The tracking store cannot be reached or does not hold the expected run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a worker or a scheduler stopping the run): handled like Ctrl-C, so the
    tracked run ends KILLED and the completed checkpoints are kept."""
