"""App-agnostic machinery: configs, CLI helpers, parallelism, chunking, memory placement."""
