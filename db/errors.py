"""The one exception type the feedback store raises for bad input."""

from __future__ import annotations


class StoreError(ValueError):
    """Bad input or a refused operation; the message is safe to show to a user.

    Whenever a store method raises it, that call wrote nothing.
    """
