"""Distributed Keras Tuner sweeps for `dtf.tune --num_tuners=N`: one chief process serving keras-tuner's oracle and N
tuner workers on 127.0.0.1 (or the KERASTUNER_* variables of a user's cluster). The repairs keras-tuner 1.4.8's
oracle needs so a sweep whose chief was killed resumes with no trial lost or run twice are in
`dtf.upstream.keras_tuner.repair_reloaded_oracle`.
"""
import os
import sys
import time
from typing import List, Optional, Sequence

ORACLE_HOST = "127.0.0.1"
# Set by the --num_tuners launcher on the chief: the tuner ids it must see stopped before it exits (see serve_oracle).
NUM_TUNERS_ENV = "DTF_TUNE_NUM_TUNERS"
PORT_RETRIES = 2
ERROR_PREFIX = "dtf.tune: error: "


def role() -> Optional[str]:
    """None (one process), "chief" (the oracle) or this worker's KERASTUNER_TUNER_ID — keras-tuner's own rule
    (keras_tuner/src/distribute/utils.py), read without importing keras-tuner (and TensorFlow) in the launcher."""
    from dtf.base.errors import UserError

    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if var not in os.environ:
            raise UserError(f"KERASTUNER_ORACLE_IP is set but {var} is not; set both (or neither)")
    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    return "chief" if "chief" in tuner_id else tuner_id


def strip_flag(args: Sequence[str], name: str) -> List[str]:
    """`args` without --name=V / --name V / --noname (the launcher's own flag)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in (f"--{name}", f"-{name}"):
            skip = True
            continue
        if arg.split("=", 1)[0] in (f"--{name}", f"-{name}"):
            continue
        out.append(arg)
    return out


def launch(argv: Sequence[str], num_tuners: int) -> int:
    """Run the chief (oracle) + `num_tuners` tuner workers on 127.0.0.1 with dtf.cluster.procs; the exit status of the
    group."""
    import threading

    from dtf.base import exitcodes
    from dtf.base.errors import UserError
    from dtf.cluster import procs, tf_config as cluster_lib

    names = ["chief"] + [f"tuner{i}" for i in range(num_tuners)]
    command = procs.python_command("-m", "dtf.tune", *strip_flag(list(argv[1:]), "num_tuners"))
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)  # tuner processes are independent; a trial's strategy comes from the flags
    width = max(len(n) for n in names)
    lock = threading.Lock()

    errors = {}  # a process's own "dtf.tune: error: ..." line, reported once it is known how that process ended

    def on_line(i, line):
        if line.startswith(ERROR_PREFIX):
            errors[i] = line
            return
        with lock:
            print(f"[{names[i]:>{width}}] {line}", flush=True)

    for attempt in range(PORT_RETRIES + 1):
        port = cluster_lib.free_ports(1, ORACLE_HOST)[0]
        common = {"KERASTUNER_ORACLE_IP": ORACLE_HOST, "KERASTUNER_ORACLE_PORT": str(port),
                  NUM_TUNERS_ENV: str(num_tuners)}
        envs = [dict(common, KERASTUNER_TUNER_ID=n) for n in names]

        def on_start(started, port=port):
            print(f"dtf.tune: oracle on {ORACLE_HOST}:{port}; " +
                  ", ".join(f"{n} pid {p.pid}" for n, p in zip(names, started)), flush=True)

        result = procs.run_group(command, [None] * len(names), env=env, process_envs=envs, on_line=on_line,
                                 on_start=on_start)
        if result.ok:
            return 0
        failed = result.workers[result.first_failure] if result.first_failure is not None else result.workers[0]
        if (failed.index == 0 and attempt < PORT_RETRIES
                and ("could not serve the oracle on" in failed.output)):
            print(f"dtf.tune: port {port} was taken; retrying on a fresh port", file=sys.stderr, flush=True)
            continue
        if failed.returncode == exitcodes.USER_ERROR and failed.index in errors:  # every process checks the flags
            raise UserError(errors[failed.index][len(ERROR_PREFIX):])  # alike: say it once, as dtf.tune itself
        for i in sorted(errors):
            print(f"[{names[i]:>{width}}] {errors[i]}", flush=True)
        print(f"dtf.tune: error: {names[failed.index]} failed ({failed.status}); stopped all "
              f"{len(names)} processes. Rerun the same command to resume the sweep.", file=sys.stderr, flush=True)
        return failed.returncode if failed.returncode and failed.returncode > 0 else 1
    return 1  # not reached


def serve_oracle(tuner, expected: Optional[set]):
    """keras-tuner's chief: serve `tuner.oracle` over gRPC until the search is over, like
    `oracle_chief.start_server`, but (1) polling every 0.2 s instead of 20 s and (2) when `expected` tuner ids are
    known (the --num_tuners launcher), staying up until every one of them has been told to stop — keras-tuner's own
    rule (no running trial and no tuner that asked is still going) lets the chief exit before a slow-starting worker
    ever connects, which then waits on it forever."""
    from concurrent import futures

    import grpc
    from keras_tuner.engine import trial as trial_module

    from dtf.base.errors import UserError
    from dtf.upstream import keras_tuner as kt_upstream

    oracle = tuner.oracle
    stopped = set()

    class Servicer(kt_upstream.OracleServicer):
        def CreateTrial(self, request, context):
            trial = self.oracle.create_trial(request.tuner_id)
            if trial.status == trial_module.TrialStatus.STOPPED:
                self.stop_triggered = True
                stopped.add(request.tuner_id)
            elif trial.status == trial_module.TrialStatus.RUNNING:
                print(f"dtf.tune: trial {trial.trial_id} -> {request.tuner_id}", flush=True)
            return kt_upstream.create_trial_response(trial)

        def EndTrial(self, request, context):
            response = super().EndTrial(request, context)
            # keras-tuner saves oracle.json before it drops the trial from the ongoing ones: save again, or a chief
            # killed now would rerun this finished trial after a reload
            self.oracle.save()
            trial = trial_module.Trial.from_proto(request.trial)
            status = str(self.oracle.trials[trial.trial_id].status).split(".")[-1].lower()
            print(f"dtf.tune: trial {trial.trial_id} ended: {status}", flush=True)
            return response

    tuner.save()
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = Servicer(oracle)
    kt_upstream.add_oracle_servicer(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise UserError(f"could not serve the oracle on {address} (port taken?)")
    server.start()
    print(f"dtf.tune: oracle serving on {address}" +
          (f", waiting for {len(expected)} tuner(s)" if expected else ""), flush=True)
    try:
        while True:
            time.sleep(0.2)
            if (servicer.stop_triggered and kt_upstream.chief_may_exit(oracle)
                    and (expected is None or expected <= stopped)):
                break
    finally:
        server.stop(grace=5).wait()

