"""Processes around the router: the `llamafleet serve` supervisor, and the router's end of its socket pair."""
