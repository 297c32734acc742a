"""A public testing kit.

- ``conformance``: the checks every device model must pass.
- ``transport``: in-memory sinks, sources and a pipe for the migration stream.
- ``harness``: one live migration inside this process, source to destination.
"""
