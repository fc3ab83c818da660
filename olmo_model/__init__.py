"""AI2's OLMo-1 on Apache TVM: config, Relax model, loader, compiler, runtime, KV pages."""
