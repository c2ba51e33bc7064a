"""mrrl."""
