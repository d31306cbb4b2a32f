"""Experiments above the library: compare methods on one dataset, report, plot."""
