"""Post-copy's data path: page records, wire records, the source's page server, the
destination's fault server, and the gate a device's DMA waits behind."""
