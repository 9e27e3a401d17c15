"""keras-tuner's search algorithms, each extended so a sweep resumes whoever serves its oracle and the hypermodel
knows which trial it builds."""
TUNERS = ("random", "bayesian", "hyperband", "grid")
PROJECT = "sweep"


def _tuner_class(name: str):
    import keras_tuner as kt

    from dtf.upstream import keras_tuner as kt_upstream

    base = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband,
            "grid": kt.GridSearch}[name]

    class DtfTuner(kt_upstream.ReloadsWhoeverServes, base):
        def run_trial(self, trial, *args, **kwargs):
            self.hypermodel.trial_id = trial.trial_id
            return super().run_trial(trial, *args, **kwargs)

    return DtfTuner


def make_tuner(name, hypermodel, objective, direction, max_trials, executions_per_trial, tune_dir, strategy, seed,
               epochs):
    import keras_tuner as kt
    from absl import flags

    from dtf.upstream import keras_tuner as kt_upstream

    kt_upstream.show_trial_tracebacks(flags.FLAGS["verbosity"].value >= 1)
    common = dict(hypermodel=hypermodel, objective=kt.Objective(objective, direction),
                  directory=tune_dir, project_name=PROJECT, overwrite=False, seed=seed,
                  distribution_strategy=strategy, executions_per_trial=executions_per_trial,
                  # a diverged trial must not stop the sweep: never reach the consecutive-failure limit
                  max_consecutive_failed_trials=max_trials + 10, max_retries_per_trial=0)
    cls = _tuner_class(name)
    if name == "hyperband":
        common["max_consecutive_failed_trials"] = 10_000
        return cls(max_epochs=epochs, factor=3, **common)
    return cls(max_trials=max_trials, **common)
