"""The findings dashboard."""
