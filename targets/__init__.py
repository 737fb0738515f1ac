"""Target descriptors (YAML data, validated by autoglm_compile.targets.TargetDescriptor)."""
