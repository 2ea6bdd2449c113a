"""The project's own error types.

Every error a user can cause and fix -- a bad config, a missing file, a run folder in the
wrong state, a loss that became non-finite -- derives from :class:`UserError`. The CLI
prints those as one paragraph (exit 2) and shows a full traceback for anything else,
because anything else is a bug in transfuse that a one-line message would hide.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors that describe a user's input, not a bug; the message says what to change."""


class DataError(UserError, ValueError):
    """A data set that cannot be loaded or does not fit the run (the message names it)."""


class ModelError(UserError, ValueError):
    """A model that cannot be built or loaded as configured (the message names the participant)."""


class FabricError(UserError, RuntimeError):
    """Devices, strategy or precision that Lightning Fabric cannot set up on this machine."""
