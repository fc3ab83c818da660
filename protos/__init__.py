"""The wire contract, and nothing that knows the model.

``generation.proto`` (public API), ``worker.proto`` (router and workers, KV pushes),
``stage.proto`` (the stages of one pipeline-parallel instance), ``admin.proto`` (cluster
administration), with their generated code, committed so that a fresh clone imports
them without a build step (``python -m protos.codegen`` regenerates them; a test checks
they are current). Beside them, three small helpers every side of the wire shares:
``grpc_server`` (servers and channels), ``errors`` (a status-carrying exception) and
``layout`` (when two workers can exchange KV pages).
"""
