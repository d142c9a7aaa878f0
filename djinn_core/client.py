"""The public client API under its first name: ``from djinn_core.client import Client``.

The code lives in :mod:`djinn_core.rpc.client`."""

from djinn_core.rpc.client import Client, RemoteCheckpoint, RemoteSession

__all__ = ["Client", "RemoteCheckpoint", "RemoteSession"]
