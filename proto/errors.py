"""The one error a decoder raises."""


class ProtocolError(ValueError):
    """A frame or message that cannot be decoded: truncated, mistyped, unknown version, absurd shape or size."""
