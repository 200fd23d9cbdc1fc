"""The shared layer: what the reference and the runtime need to speak about the same model (architecture
registry, requests and batches, checkpoint and adapter-file reading, capture). Imports nothing above it."""
