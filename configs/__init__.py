"""Pipeline presets O0-O3 (YAML data, validated by autoglm_compile.config.PipelineConfig)."""
