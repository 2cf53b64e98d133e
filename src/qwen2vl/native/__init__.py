"""Small C kernels compiled on the user's machine on first use (build.py), with torch-facing wrappers.

Optional by design: every caller has a torch path for when no compiler is available."""
