"""The audit's steps and report: reading and measuring pairs, streaming statistics, checks and plots."""
