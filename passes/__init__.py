"""Built-in graph passes, one per file. Each registers itself with @register_pass when imported."""
