"""One error type for bad user input: the CLI turns it into exit code 2, services into INVALID_ARGUMENT / 400."""


class InputError(ValueError):
    """The request or file is unusable (corrupt, wrong shape/format, unknown modality); the message says why."""


class ConfigError(ValueError):
    """The configuration asks for something this machine or install cannot do (reported, not a traceback)."""


class NotFound(InputError):
    """The request names something that does not exist (a job id); services answer NOT_FOUND / 404."""
