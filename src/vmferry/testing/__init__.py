"""A public testing kit.

- ``conformance``: the checks every device model must pass.
- ``transport``: in-memory sinks, sources and a pipe for the migration stream, and a
  socket link (a source's connector joined to a destination's acceptor, without TCP).
- ``harness``: one live migration inside this process, source to destination.
"""
