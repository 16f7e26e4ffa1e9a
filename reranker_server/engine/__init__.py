"""The engine: cascade, worker pool and loading. Works without HTTP."""
