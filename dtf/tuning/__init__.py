"""Keras Tuner sweeps over global batch × LR × warmup: the search space, the hypermodel (a trial is a run),
results, objectives, and the distributed tuners (chief oracle + workers)."""
