"""The cluster engines that run a dtf job instead of the local launcher: Slurm (sbatch script and per-task
entry point), Kubeflow TFJob manifests, Ray. No TensorFlow in the launching process."""
