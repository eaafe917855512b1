"""The error raised for checkpoint files that cannot be read."""


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, truncated, corrupt or unsupported.

    The message says what was wrong and, when known, where in the checkpoint's tree
    (e.g. `'params/Dense_0/kernel'`). Reading never returns part of a tree: either
    the whole checkpoint is read or this is raised.

    It subclasses `ValueError`, so `except ValueError` catches it too.
    """
