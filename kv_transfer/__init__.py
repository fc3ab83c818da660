"""Moving one sequence's K/V from a prefill stage to a decode stage, verified.

``codec``: the push as a chunk stream (header, K/V blocks, last hidden state, CRC32
trailer) and its checked assembly on the receiver; ``grpc_transport``: the push over
gRPC; ``transports``: which transports a worker offers and which a push uses.
"""
