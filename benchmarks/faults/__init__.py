"""The labelled fault benchmark: short training runs with one injected fault (or none)."""
