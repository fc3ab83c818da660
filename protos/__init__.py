"""The wire contract: generation.proto (public) and worker.proto (internal), with generated code.

The generated modules are committed so that a fresh clone imports them without a build
step; ``python -m protos.codegen`` regenerates them and a test checks they are current.
"""
