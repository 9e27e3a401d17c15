"""Where the processes of a job are and how they start: TF_CONFIG and the Slurm allocation (ClusterInfo), free
ports, worker process groups, private network namespaces. No TensorFlow."""
from dtf.cluster.tf_config import ClusterInfo, build_tf_config, parse_tf_config

__all__ = ["ClusterInfo", "build_tf_config", "parse_tf_config"]
