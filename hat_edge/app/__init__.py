"""The application layer: whole jobs made of the lower rooms.

`hat_edge.search` (evolution and the measured loop) knows nothing of this package; the CLI
(`hat_edge/commands/`) calls it. See docs/CONTRACTS.md.
"""
