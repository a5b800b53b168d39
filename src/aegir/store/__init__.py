"""The only code that touches storage."""
