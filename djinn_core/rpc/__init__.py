"""Remote sessions: the wire format, the transports (ZeroMQ, shared memory), the server and the client."""
