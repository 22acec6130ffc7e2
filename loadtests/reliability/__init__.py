"""Reliability runs that print figures: `make overload` (loadtests.reliability.overload) and `make soak` "
"(loadtests.reliability.soak)."""
