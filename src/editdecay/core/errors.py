"""One exception type for mistakes a user can fix: bad config, data or model choice."""


class EditDecayError(ValueError):
    """A user-actionable error. The message names the field, the value and what is valid."""


class ConfigError(EditDecayError):
    """A configuration value is invalid or conflicts with another one."""


class DataError(EditDecayError):
    """An edit or training record is unusable."""
