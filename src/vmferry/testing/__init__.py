"""A public testing kit: checks any device model must pass."""
