"""Plumbing: file formats, checkpoint files, run folders and logs, command-line checks. No technique here."""
