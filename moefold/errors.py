"""Errors the CLI reports as one line (no traceback); kept free of heavy imports so that
`moefold --help` and `moefold plan` start without loading torch.distributed.checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class RunFolderError(RuntimeError):
    """A run folder that cannot be used (in use, not writable, full); names the path and cause."""


class NonFiniteError(FloatingPointError):
    """Training stopped on non-finite losses or gradients; nothing poisoned was saved."""


class CheckpointRefused(CheckpointError):
    """A checkpoint file crafted or altered so that loading it could run code; resume=auto
    stops on it rather than falling back (someone tampered with the folder)."""
