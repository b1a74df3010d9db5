"""Errors that mean "the input is wrong": the CLI prints them on one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


class ModelNotAvailable(UserError):
    """A model that cannot be loaded here (no hub access and no local copy)."""


class CalibrationError(UserError):
    """Calibration statistics or losses that are not finite."""
