"""The user-facing errors: each names what is wrong (the dotted config key, the ``file:row``, the
path) so that a command can print it as one ``error:`` line and exit 2, with no traceback."""


class UserError(ValueError):
    """A mistake in what the user gave (config, data, paths, checkpoints), not a bug."""


class ConfigError(UserError):
    """A bad configuration key or value; the message names the full dotted key."""


class DataError(UserError):
    """Malformed data: the message lists each bad row as ``file:row: reason``."""
