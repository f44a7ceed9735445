"""Operator surfaces: logs, scoreboard, status, metrics, control verbs, pid file, check."""
