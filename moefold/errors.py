"""Errors the CLI reports as one line (no traceback); kept free of heavy imports so that
`moefold --help` and `moefold plan` start without loading torch.distributed.checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""
