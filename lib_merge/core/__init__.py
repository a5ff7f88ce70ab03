"""The foundation every other layer stands on: errors, randomness, heap policy, key tables, architectures
and block layouts, checkpoint files (lazy reads, streaming writes, hashes), block weights and masks.
Nothing here imports another layer of lib_merge."""
