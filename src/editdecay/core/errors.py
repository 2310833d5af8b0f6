"""One exception type for mistakes a user can fix: bad config, data or model choice."""


class EditDecayError(ValueError):
    """A user-actionable error. The message names the field, the value and what is valid."""


class ConfigError(EditDecayError):
    """A configuration value is invalid or conflicts with another one."""


class DataError(EditDecayError):
    """An edit or training record is unusable."""


class NonFiniteError(EditDecayError):
    """A computed value (statistics, keys, targets, deltas, metrics) is NaN or infinite."""


class StatisticsError(ConfigError):
    """The E1 key statistics cannot support an edit: too few tokens, or C numerically rank-deficient."""


class TokenBoundaryError(DataError):
    """A request's subject does not end on a token boundary of its full prompt (E2 keys vs E6 evaluation)."""
