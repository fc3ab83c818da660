"""Decode worker: installs received KV pages and runs continuous batching with batch_decode."""
