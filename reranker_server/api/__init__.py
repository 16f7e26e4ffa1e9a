"""HTTP layer: one module per dialect, the schemas, the error table and health."""
