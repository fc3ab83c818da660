"""Prefill worker: batches prompts, runs the prefill, ships KV pages and hidden states."""
