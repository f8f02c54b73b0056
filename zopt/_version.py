"""The zopt version: a leaf module, so anything can read it without importing the facade."""

__version__ = "0.1.0"
