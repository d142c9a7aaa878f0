"""Remote sessions: the wire format, the transports (ZeroMQ, shared memory), the server and the client.

Nothing is imported here, so ``djinn_core.rpc.cli`` and ``djinn_core.rpc.config`` load without torch or ZeroMQ. The
modules and their jobs: ``docs/server.md`` ("The code")."""
