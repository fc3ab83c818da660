"""The public face of the cluster: generation API, scheduling, the command line."""
