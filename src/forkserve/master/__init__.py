"""The master: the supervisor's loop, listeners, signals, reload, upgrade, systemd, identity.

Runs in the master process only. Nothing here serves a connection.
"""
