class CheckpointError(ValueError):
    """A checkpoint (training state or imported weights) cannot be used; the message names the
    file or key and the reason."""
