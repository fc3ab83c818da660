"""Everything that starts the cluster: the ``olmo-serve`` CLI, the in-process local cluster,
the Ray-managed cluster (manager, worker actors), its config file and admin API."""
