"""Manage stage: a client for TorchServe's inference and management APIs, and the ``python -m manage`` command line."""
