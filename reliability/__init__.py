"""Reliability runs that print figures: `make overload` (reliability.overload) and `make soak` (reliability.soak)."""
