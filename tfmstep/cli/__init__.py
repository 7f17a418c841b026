"""Command-line programs (thin absl mains; the work is in the library)."""
