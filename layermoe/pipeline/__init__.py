"""Pipeline steps: each reads the manifest, calls the library, records what it did.

The CLI calls exactly one function of one module here per command.
"""
