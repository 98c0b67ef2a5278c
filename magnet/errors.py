"""The one error type users see: a one-line message naming the file and the field."""


class UserError(Exception):
    """Bad input or arguments. The CLI prints ``magnet: error: <message>`` and exits 2."""

    def __init__(self, message: str, collective: bool = False):
        if "\n" in message:
            raise ValueError("UserError messages are one line")
        super().__init__(message)
        self.collective = collective  # raised alike on every rank of a training: printed by rank 0 only
