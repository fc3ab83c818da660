"""Kernels built once per process.

Our kernels are TVMScript, and parsing it is the slowest step of building one. A process
that compiles several libraries of one model (a local cluster's workers, one per stage;
a test session) asks for the same kernels again and again: a builder decorated with
``built_once`` builds each set of arguments once. TVM's IR is immutable, so one PrimFunc
can go into any number of modules.
"""

from __future__ import annotations

import functools

# Distinct kernels a process keeps: a model has a few dozen; each is a few kilobytes.
built_once = functools.lru_cache(maxsize=256)
