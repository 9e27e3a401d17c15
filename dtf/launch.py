"""`python -m dtf.launch --num_workers=N [--max_restarts=R] [--timeout=S] [--dry_run] -- <command...>`

Runs N copies of a command on this machine as one multi-worker cluster on 127.0.0.1 (worker 0 is the chief), each
with its own TF_CONFIG and DTF_LAUNCH_RESTART (how many times the group was started before this one). Output is
streamed line by line as `[chief] ...` / `[worker 1] ...`. When a worker fails, the others are stopped at once (a
MultiWorkerMirroredStrategy cannot go on without a peer; the survivors would hang in a collective), the launcher
says which worker died and shows its last lines, and, while --max_restarts allows, restarts all of them on new
ports; the job resumes from the chief's backup in its model_dir. A worker that could not bind its port is retried
on fresh ports without using up a restart.

Restarts follow dtf's exit-status table (below): a crash (1, or any unlisted status) restarts the group while
--max_restarts allows; a preempted worker (143, e.g. one ended by SIGTERM) restarts it without using up a restart; a
user error (2) or a diverged run (3) is never restarted, since a rerun would fail the same way.

Preemption: a SIGTERM (or SIGINT) to the launcher is passed on to every worker as SIGTERM; dtf workers then stop at
one agreed step, the chief backs up there, and they exit 143 (dtf.experiment.preemption). The launcher waits up to
--preemption_grace_s for them (then SIGKILL) and exits 143 (130 for SIGINT); the rerun resumes at that step. A worker
that exits 143 by itself (it got the SIGTERM) gives the others the same time before they are killed, and the group is
restarted, uncounted.

Elastic (--min_workers=M): a worker slot that keeps failing (it crashed again within 60 s of its restart, as one
does whose host or device is gone) restarts the group with one worker fewer, down to M, and the launcher says
so; the job resumes from the chief's backup on the smaller group at the same global batch (dtf.experiment.elastic).
Each such restart counts against --max_restarts. A rerun may also simply give another --num_workers.

Exit status: the chief's (0 when every worker succeeded); otherwise the failed worker's (128+N for signal N); 124
when --timeout ran out; 130/143 when the launcher itself got SIGINT/SIGTERM; 2 for bad input to the launcher.

Security: TensorFlow's worker servers listen on every interface, unauthenticated, whatever TF_CONFIG says; the
launcher therefore runs the group in a private network namespace with loopback only (--isolate_network, the default),
where nothing outside this host can reach them (nor can the workers reach the network).

`--emit=tfjob|slurm` prints a cluster manifest for the same command instead of running it (see dtf.backends.tfjob,
dtf.backends.slurm); `--data_service_workers=N` adds a tf.data service to it (dtf.cluster.data_service). `--backend=ray`
runs it on Ray Train workers instead of local processes (see dtf.backends.ray).
"""
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import List, Optional, Sequence, Tuple

from absl import flags

from dtf import cli
from dtf.backends import slurm, tfjob as manifests
from dtf.base import errors, exitcodes
from dtf.base.errors import UserError
from dtf.base.logs import get_logger
from dtf.cluster import netns, procs, relay, tf_config as cluster_lib

log = get_logger("dtf.launch")  # not __name__: that is "__main__" under `python -m`

# A private flag registry: the launcher's flags must not collide with those of a program imported in the same process.
FLAGS = flags.FlagValues()
flags.DEFINE_integer("num_workers", None, "Number of worker processes (worker 0 is the chief).", flag_values=FLAGS)
SLOT_WINDOW_S = 60.0  # a slot that crashes within this long of two starts in a row keeps failing (--min_workers)
flags.DEFINE_integer("min_workers", None, "Elastic: when a worker slot keeps failing (it crashes again within "
                     f"{SLOT_WINDOW_S:g} s of its restart), restart the group with one worker fewer, down to this "
                     "many; the run resumes on them at the same global batch. Default: --num_workers (never fewer). "
                     "With --backend=ray: Ray Train's elastic worker range (min, --num_workers).", flag_values=FLAGS)
flags.DEFINE_integer("max_restarts", 0, "Restart the whole group up to this many times after a worker fails.",
                     flag_values=FLAGS)
flags.DEFINE_float("timeout", None, "Seconds the whole job (all restarts included) may take; then stop everyone.",
                   flag_values=FLAGS)
flags.DEFINE_float("preemption_grace_s", exitcodes.LAUNCHER_GRACE_S, "Seconds the workers get to back up and exit "
                   "after the launcher passes on a SIGTERM/SIGINT, or after one worker exits preempted (143); then "
                   "they are killed. Keep it above the workers' own --preemption_grace_s "
                   f"(default {exitcodes.PREEMPTION_GRACE_S:g}).", flag_values=FLAGS)
flags.DEFINE_bool("isolate_network", True, "Run the workers in a private network namespace with only loopback "
                  "(Linux): their TensorFlow servers listen on every interface, and this keeps them unreachable from "
                  "other hosts. --noisolate_network for workers that need the network (e.g. a gs:// model_dir), on a "
                  "trusted network only.", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print each worker's TF_CONFIG (one JSON per line) and the command; start nothing.",
                  flag_values=FLAGS)
flags.DEFINE_string("emit", None, f"Print a cluster manifest instead of running: one of {', '.join(manifests.KINDS)}.",
                    flag_values=FLAGS)
flags.DEFINE_string("image", None, f"Container image for --emit=tfjob (default {manifests.DEFAULT_IMAGE}).",
                    flag_values=FLAGS)
flags.DEFINE_string("evaluator", None, "Also run this command (one shell-quoted string, e.g. the same dtf.run command) "
                    "as the TF_CONFIG evaluator task: beside the local workers, as the Evaluator pod with "
                    "--emit=tfjob, or as a one-task step beside the workers' with --emit=slurm. It scores the "
                    "chief's checkpoints and never joins training.", flag_values=FLAGS)
flags.DEFINE_string("job_name", None, f"Job name for --emit (default {manifests.DEFAULT_JOB_NAME}).",
                    flag_values=FLAGS)
flags.DEFINE_enum("backend", "local", ["local", "ray"], "Where the workers run: local processes on 127.0.0.1, or Ray "
                  "Train workers (dtf.backends.ray; needs pip install -e '.[ray]').", flag_values=FLAGS)
flags.DEFINE_string("address", None, "--backend=ray: the Ray cluster to join (default: start a local one). The "
                    "workers run the command in this directory, which every node must have (shared storage).",
                    flag_values=FLAGS)
# --emit=slurm only (see dtf.backends.slurm for the layout and restart rules).
flags.DEFINE_string("nodes", None, "--emit=slurm: nodes (default: one task per node, so --num_workers), or a "
                   "range MIN-MAX: the job runs on the nodes Slurm grants and resumes on another count after a "
                   "requeue (elastic; --num_workers is then MAX × --tasks_per_node).", flag_values=FLAGS)
flags.DEFINE_integer("tasks_per_node", None, "--emit=slurm: workers per node (default 1: one worker drives all of "
                     "a node's GPUs).", flag_values=FLAGS)
flags.DEFINE_string("gres", None, "--emit=slurm: generic resources per node, e.g. gpu:4.", flag_values=FLAGS)
flags.DEFINE_string("time", None, "--emit=slurm: Slurm time limit, e.g. 90 or 1:30:00 (or give --timeout seconds).",
                    flag_values=FLAGS)
flags.DEFINE_string("partition", None, "--emit=slurm: Slurm partition.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "--emit=slurm: the job's log file, e.g. logs/%x-%j.out.", flag_values=FLAGS)
SLURM_FLAGS = ("nodes", "tasks_per_node", "gres", "time", "partition", "output")
# --emit=tfjob only (see dtf.backends.tfjob).
flags.DEFINE_integer("gpus_per_worker", None, "--emit=tfjob: GPUs per training pod (nvidia.com/gpu).",
                     flag_values=FLAGS)
flags.DEFINE_string("cpu", None, "--emit=tfjob: CPU per training pod, e.g. 4 or 500m.", flag_values=FLAGS)
flags.DEFINE_string("memory", None, "--emit=tfjob: memory per training pod, e.g. 16Gi.", flag_values=FLAGS)
flags.DEFINE_string("volume", None, "--emit=tfjob: CLAIM:/mount/path, a shared PersistentVolumeClaim mounted in "
                    "every pod; --model_dir must be under it so restarted pods resume.", flag_values=FLAGS)
TFJOB_FLAGS = ("gpus_per_worker", "cpu", "memory", "volume")
flags.DEFINE_integer("data_service_workers", None, "--emit=tfjob|slurm: also run a tf.data service (a dispatcher and "
                     "this many workers) for the job, and add --data_service=grpc://... to the command.",
                     flag_values=FLAGS)

HOST = "127.0.0.1"  # local clusters never listen for, or point at, another address
PORT_RETRIES = 3
REPORT_LINES = 20
TIMEOUT_STATUS = 124
_NEVER_RESTART_REASON = {exitcodes.USER_ERROR: "user error", exitcodes.DIVERGED: "training diverged"}
# How a worker says it could not bind its port: TF's gRPC server (measured on TF 2.21), or a plain socket error.
_PORT_TAKEN = re.compile(r"Could not start gRPC server|Failed to add port to server|Address already in use")


def parse_args(argv: Sequence[str]) -> List[str]:
    """Parse the launcher's flags (into FLAGS) and return the command after `--`; raise UserError on bad input."""
    args = list(argv[1:])
    split = args.index("--") if "--" in args else len(args)
    flag_args, command = args[:split], args[split + 1:]
    FLAGS.unparse_flags()  # start from the defaults on every call, not from the previous call's values
    extra = cli.parse_flags([argv[0], *flag_args], FLAGS)[1:]
    if extra:
        raise UserError(f"unexpected argument {extra[0]!r} before '--'; put the command to run after '--', e.g. "
                        "python -m dtf.launch --num_workers=2 -- python train.py")
    if FLAGS.num_workers is None:
        raise UserError("--num_workers is required; e.g. --num_workers=2")
    if FLAGS.num_workers < 1:
        raise UserError(f"--num_workers must be >= 1, got {FLAGS.num_workers}; e.g. --num_workers=2")
    if FLAGS.min_workers is not None and not 1 <= FLAGS.min_workers <= FLAGS.num_workers:
        raise UserError(f"--min_workers must be between 1 and --num_workers={FLAGS.num_workers}, got "
                        f"{FLAGS.min_workers}")
    if FLAGS.min_workers is not None and FLAGS.emit:
        raise UserError(f"--min_workers does not apply to --emit={FLAGS.emit}; for Slurm give a node range, e.g. "
                        "--nodes=1-2")
    if FLAGS.max_restarts < 0:
        raise UserError(f"--max_restarts must be >= 0, got {FLAGS.max_restarts}; use 0 for no restarts")
    if FLAGS.preemption_grace_s <= 0:
        raise UserError(f"--preemption_grace_s must be > 0 seconds, got {FLAGS.preemption_grace_s:g}")
    if FLAGS.timeout is not None and FLAGS.timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {FLAGS.timeout:g}; leave it out for no limit")
    if FLAGS.emit is not None and FLAGS.emit not in manifests.KINDS:
        raise UserError(f"--emit={FLAGS.emit} is not a manifest kind; use --emit=tfjob or --emit=slurm")
    if FLAGS.emit and FLAGS.dry_run:
        raise UserError("--emit and --dry_run both print instead of running; use one of them")
    for name in ("image", *TFJOB_FLAGS):
        if FLAGS[name].value is not None and FLAGS.emit != "tfjob":
            raise UserError(f"--{name} only applies to --emit=tfjob; remove it or add --emit=tfjob")
    if FLAGS.backend == "ray":
        for name in ("emit", "dry_run", "timeout", "evaluator"):
            if FLAGS[name].value not in (None, False):
                raise UserError(f"--{name} does not apply to --backend=ray; remove it or use --backend=local")
    if FLAGS.address is not None and FLAGS.backend != "ray":
        raise UserError("--address only applies to --backend=ray; remove it or add --backend=ray")
    for name in SLURM_FLAGS:
        if FLAGS[name].value is not None and FLAGS.emit != "slurm":
            raise UserError(f"--{name} only applies to --emit=slurm; remove it or add --emit=slurm")
    if FLAGS.data_service_workers is not None:
        if not FLAGS.emit:
            raise UserError("--data_service_workers only applies with --emit=tfjob|slurm; locally, give the command "
                            "--data_service=local:N")
        if FLAGS.data_service_workers < 1:
            raise UserError(f"--data_service_workers must be >= 1, got {FLAGS.data_service_workers}")
        if any(arg.startswith("--data_service") for arg in command):
            raise UserError("--data_service_workers points the command at its own tf.data service; remove "
                            "--data_service from the command")
    if FLAGS.job_name is not None and not FLAGS.emit:
        raise UserError("--job_name only applies with --emit=tfjob|slurm; remove it or add --emit")
    if FLAGS.evaluator is not None and not evaluator_command():
        raise UserError("--evaluator is empty; give the evaluator's command, e.g. --evaluator='python -m dtf.run "
                        "--flagfile=exp.flags'")
    if not command:
        raise UserError("no command to launch; put it after '--', e.g. "
                        "python -m dtf.launch --num_workers=2 -- python train.py")
    if not (FLAGS.emit or FLAGS.dry_run) and shutil.which(command[0]) is None:
        raise UserError(f"command {command[0]!r} after '--' was not found; give a program on PATH or a path to one")
    return command


def evaluator_command() -> Optional[List[str]]:
    """--evaluator as an argument list (None when not given)."""
    if FLAGS.evaluator is None:
        return None
    try:
        return shlex.split(FLAGS.evaluator)
    except ValueError as e:
        raise UserError(f"--evaluator={FLAGS.evaluator} is not a shell-quoted command ({e})") from None


def _fresh_hosts(num_workers: int, avoid: Sequence[str]) -> List[str]:
    """Loopback addresses on free ports, none reused from the previous start (its ports may still be held)."""
    while True:
        hosts = [f"{HOST}:{port}" for port in cluster_lib.free_ports(num_workers, HOST)]
        if not set(hosts) & set(avoid):
            return hosts


def tf_configs(hosts: Sequence[str], evaluator_host: Optional[str] = None) -> List[str]:
    """One TF_CONFIG per worker, then the evaluator's (its address is in every cluster spec, as TF expects)."""
    configs = [cluster_lib.build_tf_config(list(hosts), i) for i in range(len(hosts))]
    if evaluator_host is None:
        return configs
    cluster = {"worker": list(hosts), "evaluator": [evaluator_host]}
    return [json.dumps({**json.loads(c), "cluster": cluster}) for c in configs] + [
        json.dumps({"cluster": cluster, "task": {"type": "evaluator", "index": 0}})]


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Printer:
    """Prints worker lines with their role; one lock so lines from different workers never interleave.

    If our stdout goes away (the reader closed the pipe), lines are dropped rather than raising: the worker pipes
    must keep being drained, or a worker blocks writing and the job hangs."""

    def __init__(self, out, role=procs.role):
        self._out, self._role, self._lock, self._broken = out, role, threading.Lock(), False

    def __call__(self, index: int, line: str):
        with self._lock:
            if self._broken:
                return
            try:
                self._out.write(f"[{self._role(index)}] {line}\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
                self._broken = True


def _report_failure(result: procs.GroupResult, hosts: Sequence[str]) -> Tuple[int, bool]:
    """Log which worker died and its last lines; return its exit status and whether it failed to bind its port."""
    dead = result.workers[result.first_failure]
    log.info("launch: %s (pid %d, %s) died: %s; stopped the others in %.1fs", dead.role, dead.pid,
             hosts[dead.index], dead.status, result.stop_s)
    if dead.tail:
        log.info("launch: last lines of %s:\n%s", dead.role,
                 "\n".join(f"  | {line}" for line in dead.tail[-REPORT_LINES:]))
    port_taken = any(_PORT_TAKEN.search(line) for line in dead.tail)
    return _exit_status(dead.returncode), port_taken


class _FailingSlot:
    """Which worker slot crashed first on consecutive starts, each within SLOT_WINDOW_S of its start."""

    def __init__(self):
        self.slot, self.count = None, 0

    def crashed(self, slot: int, after_s: float) -> int:
        """Record a crash of `slot` `after_s` seconds into its start; the number of starts in a row it did so."""
        quick = after_s <= SLOT_WINDOW_S
        self.slot, self.count = slot, (self.count + 1 if quick and slot == self.slot else int(quick))
        return self.count

    def clear(self):
        self.slot, self.count = None, 0


def launch(command: Sequence[str], num_workers: int, *, max_restarts: int = 0,
           timeout_s: Optional[float] = None, evaluator: Optional[Sequence[str]] = None,
           preemption_grace_s: float = exitcodes.LAUNCHER_GRACE_S, min_workers: Optional[int] = None) -> int:
    """Run `command` as `num_workers` local workers until they all succeed, restarting after failures (with fewer
    workers, down to `min_workers`, when one slot keeps failing); see the module doc."""
    min_workers = num_workers if min_workers is None else min_workers
    failing = _FailingSlot()
    printer = _Printer(sys.stdout, lambda i: roles[i])
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    restarts = port_retries = start = 0
    hosts: List[str] = []
    began = time.monotonic()
    while True:
        roles = [procs.role(i) for i in range(num_workers)] + (["evaluator"] if evaluator else [])
        group = f"{num_workers} worker(s)" + (" and an evaluator" if evaluator else "")
        hosts = _fresh_hosts(num_workers + bool(evaluator), hosts)
        log.info("launch: starting %s on %s (DTF_LAUNCH_RESTART=%d)", group, ",".join(hosts), start)

        def on_start(started, hosts=hosts):
            for i, p in enumerate(started):
                log.info("launch: %s pid %d (%s)", roles[i], p.pid, hosts[i])

        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        started_at = time.monotonic()
        configs = tf_configs(hosts[:num_workers], hosts[num_workers] if evaluator else None)
        result = procs.run_group(command, configs, env=dict(os.environ, DTF_LAUNCH_RESTART=str(start)),
                                 process_commands=[None] * num_workers + [evaluator] if evaluator else None,
                                 timeout_s=remaining, on_line=printer, on_start=on_start,
                                 preemption_grace_s=preemption_grace_s)
        start += 1
        if result.ok:
            log.info("launch: all %s finished in %.1fs (%d restart(s))", group,
                     time.monotonic() - began, restarts)
            return result.workers[0].returncode
        if result.timed_out:
            log.info("launch: --timeout=%gs ran out; stopped all workers in %.1fs", timeout_s, result.stop_s)
            return TIMEOUT_STATUS
        status, port_taken = _report_failure(result, hosts)
        if port_taken and port_retries < PORT_RETRIES:
            port_retries += 1
            log.info("launch: a port was taken; retrying on fresh ports (%d of %d)", port_retries, PORT_RETRIES)
            continue
        if not exitcodes.should_restart(status):
            log.info("launch: not restarting: exit status %d (%s) would repeat on a rerun", status,
                     _NEVER_RESTART_REASON[status])
            return status
        if deadline is not None and time.monotonic() >= deadline:
            log.info("launch: --timeout=%gs ran out; not restarting", timeout_s)
            return TIMEOUT_STATUS
        if status == exitcodes.PREEMPTED:
            failing.clear()
            log.info("launch: preempted (exit status %d); restarting all %s on new ports (not counted "
                     "against --max_restarts)", status, group)
            continue
        dead = result.workers[result.first_failure]
        in_a_row = failing.crashed(dead.index, time.monotonic() - started_at - (result.stop_s or 0.0))
        if restarts >= max_restarts:
            if max_restarts:
                log.info("launch: giving up after %d restart(s)", restarts)
            return status
        restarts += 1
        if in_a_row >= 2 and num_workers > min_workers and dead.index < num_workers:
            failing.clear()
            log.info("launch: %s crashed within %gs of %d starts in a row: restarting on %d worker(s) instead of "
                     "%d (--min_workers=%d; restart %d of %d); the run resumes on them at the same global batch",
                     dead.role, SLOT_WINDOW_S, in_a_row, num_workers - 1, num_workers, min_workers, restarts,
                     max_restarts)
            num_workers -= 1
            continue
        log.info("launch: restarting all %s on new ports (restart %d of %d)", group, restarts,
                 max_restarts)


def emit(command: Sequence[str]) -> str:
    """The --emit manifest for `command`, from the parsed FLAGS."""
    job_name = manifests.check_job_name(FLAGS.job_name or manifests.DEFAULT_JOB_NAME)
    # Unset: the cluster manager's own default (e.g. TFJob's backoffLimit), not ours.
    max_restarts = FLAGS.max_restarts if FLAGS["max_restarts"].present else None
    if FLAGS.emit == "tfjob":
        resources = manifests.PodResources(FLAGS.gpus_per_worker, FLAGS.cpu, FLAGS.memory)
        volume = manifests.SharedVolume.parse(FLAGS.volume) if FLAGS.volume is not None else None
        return manifests.tfjob(command, FLAGS.num_workers, image=FLAGS.image or manifests.DEFAULT_IMAGE,
                               job_name=job_name, max_restarts=max_restarts, timeout_s=FLAGS.timeout,
                               evaluator=evaluator_command(), resources=resources, volume=volume,
                               data_service_workers=FLAGS.data_service_workers)
    return slurm.sbatch(command, FLAGS.num_workers, job_name=job_name, max_restarts=max_restarts,
                        timeout_s=FLAGS.timeout, evaluator=evaluator_command(),
                        data_service_workers=FLAGS.data_service_workers,
                        **{name: FLAGS[name].value for name in SLURM_FLAGS})


def _ray(command: Sequence[str]) -> int:
    """--backend=ray: the same command on Ray Train workers (imported here: Ray is an optional extra)."""
    from dtf.backends import ray as ray_backend

    return ray_backend.fit(command, FLAGS.num_workers, address=FLAGS.address, max_restarts=FLAGS.max_restarts,
                           min_workers=FLAGS.min_workers)


def main(argv: Sequence[str]) -> int:
    return cli.guard("dtf.launch", lambda: _main(argv))


def _main(argv: Sequence[str]) -> int:
    if set(cli.HELP_FLAGS) & set(argv[1:argv.index("--") if "--" in argv else None]):
        print(__doc__ + "\nFlags:\n" + FLAGS.get_help() + "\n\n" + cli.exit_status_help())
        return exitcodes.OK
    command = parse_args(argv)
    if FLAGS.emit:
        print(emit(command), end="")
        return exitcodes.OK
    if FLAGS.dry_run:
        print("\n".join(tf_configs(_fresh_hosts(FLAGS.num_workers, []))))
        print(shlex.join(command))
        return exitcodes.OK
    if FLAGS.backend == "ray":
        return _ray(command)
    relays = {}
    if FLAGS.isolate_network:
        relays = relay.start_all(_http_tracking_uris(command))  # before isolating: their outer ends stay outside
        refused = netns.isolate()
        if refused:
            relay.stop_all(relays)
            raise UserError(f"--isolate_network: cannot give the workers a private network here ({refused}); on a "
                            "trusted network, rerun with --noisolate_network")
        os.environ[netns.ISOLATED_ENV] = "1"
        log.info("launch: workers run in a private network namespace with loopback only: their TensorFlow servers "
                 "(which listen on every interface) are unreachable from other hosts")
        relay.open_inside(relays)  # an http:// --tracking_uri stays reachable (dtf.cluster.relay)
    procs.raise_stopped_on_signals()
    try:
        return launch(command, FLAGS.num_workers, max_restarts=FLAGS.max_restarts, timeout_s=FLAGS.timeout,
                      evaluator=evaluator_command(), preemption_grace_s=FLAGS.preemption_grace_s,
                      min_workers=FLAGS.min_workers)
    except errors.Stopped as stop:
        log.info("launch: got %s; stopped all workers (they had %gs to back up)", signal.Signals(stop.signum).name,
                 FLAGS.preemption_grace_s)
        return 128 + stop.signum
    finally:
        relay.stop_all(relays)


def _http_tracking_uris(command: Sequence[str]) -> List[str]:
    """The http(s):// --tracking_uri of the command and of --evaluator (read through their flagfiles)."""
    from dtf.config.flags import arg_value
    from dtf.tracking.store import canonical, is_http

    given = [arg_value(list(c), "tracking_uri") for c in (command, evaluator_command() or [])]
    return [canonical(uri) for uri in given if uri and is_http(canonical(uri))]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
