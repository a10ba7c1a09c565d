"""Every checkpoint problem is a `CheckpointError` (a ValueError) whose message says
what and where; the subclasses tell a caller what it may do about it."""


class CheckpointError(ValueError):
  """A checkpoint cannot be read, or does not fit the model; says what and where."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint belongs to a different model or optimizer (names the differences)."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint's files are missing, truncated or unreadable."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (no space, ...); the previous ones are intact."""
