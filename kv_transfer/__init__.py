"""Moving one sequence's K/V from a prefill stage to a decode stage, verified.

``codec``: the push as a chunk stream (header, K/V blocks, last hidden state, CRC32
trailer) and its checked assembly on the receiver; ``wire_blocks``: blocks encoded and
read without protobuf's copies; ``grpc_transport``: the push over gRPC;
``shared_memory``: same-host pushes; ``buffers``: pooled K/V buffers; ``transports``:
which transports a worker offers and which a push uses.
"""
