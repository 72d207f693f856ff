"""The wire protocol without I/O: message models, channel names, session state, presence and limits.

Nothing in this package imports Trio, sockets or the database; everything takes values and returns values.
"""
