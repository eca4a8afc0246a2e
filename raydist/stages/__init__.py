"""Runnable stages: each file builds its Ray program (driver) and holds its worker loop."""
