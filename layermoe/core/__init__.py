"""What every step stands on, torch-free: errors, consoles, progress, devices, the manifest,
the work dir (atomic writes, the lock, step states) and integrity (every file hash)."""
