"""Runners: one model each, behind one tiny contract (see base.py)."""
