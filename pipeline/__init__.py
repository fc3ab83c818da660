"""Pipeline-parallel instances: the typed stage interface both roles share.

An instance is a chain of stages over contiguous layer ranges; its first stage leads and
runs every operation through the chain (``chain.StageChain``). A stage is a ``Stage``
(``stage.py``): the worker's own stage is called directly, the others through
``RemoteStage`` over gRPC (``remote.py``). Operations are the dataclasses of ``ops.py``;
protobuf appears only in ``wire.py`` and ``remote.py``.
"""
