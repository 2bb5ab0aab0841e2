"""Token dispatchers: local reference, all-to-all and all-gather."""
