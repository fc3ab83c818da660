"""Moving one sequence's K/V from a prefill stage to a decode stage, verified.

``transport``: the seam, sender and receiver protocols (``PushSender``/``KVTransfer``:
open, push piece, finish, abort; ``PieceSink``: claim, commit, release), the transfer's
states and the negotiation of which ``Transport`` carries a push; ``grpc_transport``: the
push over gRPC, inline or naming same-host shared memory; ``fake``: an in-process
transport for unit tests; ``codec``: the push as a chunk stream (header, K/V blocks, last
hidden state, CRC32 trailer) and its checked assembly; ``wire_blocks``: blocks encoded and
read without protobuf's copies; ``shared_memory``: same-host buffers; ``buffers``: pooled
K/V buffers; ``transports``: which transports a worker lists; ``nccl``: the NCCL binding
(a binding only: no push uses it).
"""
