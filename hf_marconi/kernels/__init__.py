"""Fast paths for hybrid models: kernel detection, single-pass branch-point capture, asynchronous state offload."""
