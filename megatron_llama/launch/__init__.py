"""Starting runs: local process groups with a deadline, and Slurm batch scripts."""
