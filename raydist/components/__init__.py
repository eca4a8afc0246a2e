"""Pure torch / transformers building blocks. Nothing under this package imports Ray (a test pins it)."""
