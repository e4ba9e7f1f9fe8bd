"""The error every release check raises: one type, so that a caller refuses a release whatever check failed."""


class ReleaseError(ValueError):
    """A release failed verification; the message names the check and the file or field."""
