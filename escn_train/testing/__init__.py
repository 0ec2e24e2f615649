"""Helpers for tests and benchmarks of escn-train (e.g. :class:`SyncCounter`)."""

from escn_train.testing.sync_counter import SyncCounter, SyncEvent

__all__ = ["SyncCounter", "SyncEvent"]
