"""The sbatch script for a dtf job: `python -m dtf.launch --emit=slurm` prints it; `sbatch` takes it unchanged.

Layout: `--nodes` × `--tasks_per_node` workers (task 0 is the chief). One task per node is the default and the
layout for GPUs: one MultiWorkerMirroredStrategy worker drives all of its node's GPUs (`--gres=gpu:G`) as local
replicas, with one gRPC server and one input pipeline per node and the in-node all-reduce on NVLink/NCCL. Several
tasks per node suit CPU nodes (or one process per GPU); with `--gres=gpu:G` each task is then bound to its own G/T
GPUs (`srun --gpu-bind=per_task:G/T`).

Each task runs `python -m dtf.backends.slurm_task -- <command>`, which sets TF_CONFIG with ports chosen per job and
reports the command's exit status. srun's `--label` prefixes every line with its task number (0 is the chief). The
step's status is that of the task that failed first (srun's own is the highest of all tasks: a peer stopped by SIGTERM
after another failed would turn a user error into a preemption), and the step reruns by dtf's exit-status table
(dtf.base.exitcodes): never after 2 (user error) or 3 (diverged); after a crash up to --max_restarts times; after 143
(preempted, or SIGTERM before the time limit, which the script asks for) the job is requeued, uncounted. Resuming
needs `model_dir` on a filesystem every node shares.

Elastic (`--nodes=MIN-MAX`): the job asks Slurm for MIN to MAX nodes (`--num_workers` is MAX × --tasks_per_node) and
the workers' step runs on the allocation Slurm actually grants (`$SLURM_JOB_NUM_NODES` nodes, `$SLURM_NTASKS` tasks):
TF_CONFIG is built from the step's nodes and tasks, so a requeued job resumes on whatever it gets, at the same
global batch (dtf.experiment.elastic).

With an evaluator command (`dtf.launch --evaluator`), the script also starts it once as a one-task step of its own
beside the workers' (`srun --overlap`: it shares the first node's CPUs and GPUs instead of holding a node of its own,
as TFJob's Evaluator pod asks for no GPU), with TF_CONFIG task type `evaluator`, so it never joins the collective and
reruns of the workers' step leave it running. Its lines are prefixed `evaluator: `. The job is done when the workers
are done and the evaluator has scored the last checkpoint; an evaluator that failed is rerun then (it resumes from
eval_results.json), counted against --max_restarts; a requeue or the workers' final failure ends it with the job.
"""
import math
import re
import shlex
from typing import List, Optional, Sequence, Tuple

from dtf.base import exitcodes
from dtf.base.errors import UserError

# Seconds before the time limit at which Slurm sends SIGTERM (dtf saves a backup and exits 143, then requeues);
# asked for only when the limit is at least MIN_LIMIT_FOR_SIGNAL_S, so a short job is not signalled at its start.
SIGNAL_BEFORE_LIMIT_S = 120
MIN_LIMIT_FOR_SIGNAL_S = 10 * 60
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_GRES = re.compile(r"^[a-z][\w.-]*(?::[\w.-]+)?(?::\d+)?$", re.I)
_NAME = re.compile(r"^[\w.@%+-]+$")
WORKER_TASKS_ENV = "DTF_SLURM_WORKER_TASKS_PER_NODE"  # the evaluator's copy of the job's SLURM_TASKS_PER_NODE


def parse_time(text: str) -> int:
    """Slurm's --time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; UserError if malformed."""
    m = _TIME.match(text.strip())
    seconds = 0
    if m and m.group(1) is not None:
        d, h, mi, s = (int(g or 0) for g in m.groups()[:4])
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    elif m:
        parts = [int(g) for g in m.groups()[4:] if g is not None]
        h, mi, s = [(0, parts[0], 0), (0, *parts), tuple(parts)][len(parts) - 1]
        seconds = (h * 60 + mi) * 60 + s
    if seconds <= 0:
        raise UserError(f"--time={text} is not a Slurm time limit; write minutes (90), HH:MM:SS (1:30:00) or "
                        "D-HH:MM:SS (2-00:00:00)")
    return seconds


def node_range(nodes) -> Tuple[Optional[int], Optional[int]]:
    """--nodes as (fewest, most): 'N' or N is (N, N), 'MIN-MAX' a range (Slurm's form); (None, None) when unset."""
    if nodes is None:
        return None, None
    m = re.match(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$", str(nodes))
    low, high = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if low < 1 or high < low:
        raise UserError(f"--nodes={nodes} is not a node count or range; write e.g. --nodes=2 or --nodes=1-2")
    return low, high


def layout(num_workers: int, nodes: Optional[int], tasks_per_node: Optional[int]) -> Tuple[int, int]:
    """(nodes, tasks per node) for `num_workers`: one task per node unless --nodes or --tasks_per_node say otherwise."""
    for flag, value in (("--nodes", nodes), ("--tasks_per_node", tasks_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if nodes is None:
        nodes = num_workers // (tasks_per_node or 1)
    if tasks_per_node is None:
        tasks_per_node = num_workers // nodes if num_workers % nodes == 0 else 0
    if nodes < 1 or nodes * tasks_per_node != num_workers:
        raise UserError(f"--num_workers={num_workers} is not --nodes × --tasks_per_node (got {nodes or '?'} × "
                        f"{tasks_per_node or '?'}); give values whose product is {num_workers}, e.g. "
                        f"--nodes=1 --tasks_per_node={num_workers}")
    return nodes, tasks_per_node


def gpus_per_node(gres: Optional[str]) -> Optional[int]:
    """The GPU count in a --gres list ('gpu:4', 'gpu:a100:4', 'gpu:2,shard:1'); None without GPUs."""
    if gres is None:
        return None
    for item in gres.split(","):
        if not _GRES.match(item):
            raise UserError(f"--gres={gres} is not a Slurm gres list; write e.g. --gres=gpu:4 or --gres=gpu:a100:4")
        fields = item.split(":")
        if fields[0] == "gpu":
            return int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return None


def _check_name(flag: str, value: Optional[str], example: str):
    if value is not None and not _NAME.match(value):
        raise UserError(f"{flag}={value!r} has characters Slurm does not take here; use e.g. {flag}={example}")


def _check_options(tasks_per_node: int, gres: Optional[str], time: Optional[str], timeout_s: Optional[float],
                   partition: Optional[str], output: Optional[str]) -> Tuple[Optional[float], Optional[int]]:
    """One line per option Slurm would reject or the job would misuse; the time limit in seconds and the GPUs per
    node."""
    if tasks_per_node > 32:
        raise UserError(f"--tasks_per_node={tasks_per_node} is over 32, the ports dtf gives one job on a node; "
                        "use one task per node, which drives all of the node's GPUs or CPUs")
    if time is not None and timeout_s is not None:
        raise UserError("--time and --timeout both set the Slurm time limit; use one of them")
    limit_s = parse_time(time) if time is not None else timeout_s
    gpus = gpus_per_node(gres)
    if gpus is not None and tasks_per_node > 1 and gpus % tasks_per_node:
        raise UserError(f"--gres={gres} gives {gpus} GPU(s) per node, which {tasks_per_node} tasks per node cannot "
                        f"share evenly; use --tasks_per_node=1 (one worker drives all GPUs) or a multiple of it")
    _check_name("--partition", partition, "gpu")
    if output is not None and (not output or any(ch.isspace() for ch in output)):
        raise UserError("--output must be a file path (Slurm patterns like %j allowed), e.g. --output=logs/%x-%j.out")
    return limit_s, gpus


def _directives(job_name: str, nodes: str, tasks_per_node: int, gres: Optional[str], time: Optional[str],
                limit_s: Optional[float], partition: Optional[str], output: Optional[str]) -> List[str]:
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if gres is not None:
        directives.append(f"--gres={gres}")
    if limit_s is not None:
        directives.append(f"--time={time if time is not None else math.ceil(limit_s / 60)}")
    if partition is not None:
        directives.append(f"--partition={partition}")
    if output is not None:
        directives.append(f"--output={output}")
    directives += ["--requeue", "--open-mode=append"]  # a requeued job appends to its log instead of erasing it
    if limit_s is not None and limit_s >= MIN_LIMIT_FOR_SIGNAL_S:
        directives.append(f"--signal=TERM@{SIGNAL_BEFORE_LIMIT_S}")
    return directives


def _workers_step(command: Sequence[str], nodes: int, tasks_per_node: int, gpus: Optional[int],
                  data_service_workers: Optional[int], elastic: bool = False) -> str:
    """The srun line running every worker task (the tf.data service's address comes from the job at run time).
    `elastic`: on the nodes and tasks the job was granted (a node range), read at run time."""
    srun = ["--label", "--kill-on-bad-exit=1"]
    if gpus is not None and tasks_per_node > 1:
        srun.append(f"--gpu-bind=per_task:{gpus // tasks_per_node}")
    srun += ["python", "-m", "dtf.backends.slurm_task", "--", *command]
    counts = ('--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_NTASKS"' if elastic
              else f"--nodes={nodes} --ntasks-per-node={tasks_per_node}")
    return f"srun {counts} {shlex.join(srun)}" + (
        ' "--data_service=grpc://$ds_host:$ds_port"' if data_service_workers else "")


def _evaluator_start_lines(evaluator: Sequence[str]) -> List[str]:
    evaluator_srun = ["srun", "--nodes=1", "--ntasks=1", "--overlap", "python", "-m", "dtf.backends.slurm_task",
                      "--evaluator", "--", *evaluator]
    return [
        "run_evaluator() {  # a step of its own: it outlives reruns of the workers' step",
        f"  {WORKER_TASKS_ENV}=$SLURM_TASKS_PER_NODE {shlex.join(evaluator_srun)} 2>&1 "
        "| sed -u 's/^/evaluator: /'",
        "  return ${PIPESTATUS[0]}",
        "}",
        "run_evaluator &",
        "evaluator=$!"]


def _workers_loop_lines(step: str, never: str, done: str) -> List[str]:
    """Run the workers' step until it succeeds (then `done`); requeue the job when preempted, rerun it after other
    failures up to $max_restarts times, never after a user error or divergence."""
    return [
        "while true; do",
        "  export DTF_LAUNCH_RESTART=$start",
        f"  {step} 2>&1 | tee \"$steplog\"",
        "  status=${PIPESTATUS[0]}  # srun's: the highest of all tasks, e.g. a stopped peer's 143",
        "  first=$(sed -n 's/^ *[0-9]*: dtf\\.backends\\.slurm_task: exited with status \\([1-9][0-9]*\\)$/\\1/p' \"$steplog\" | head -n 1)",
        "  status=${first:-$status}",
        "  start=$((start + 1))",
        "  case $status in",
        f"    {exitcodes.OK}) {done} ;;",
        f'    {never}) echo "dtf: step exited with status $status (user error or diverged); not rerunning" >&2',
        "       exit $status ;;",
        f'    {exitcodes.PREEMPTED}) echo "dtf: step preempted (status $status); requeueing job $SLURM_JOB_ID" >&2',
        '       scontrol requeue "$SLURM_JOB_ID" && exit $status',
        '       echo "dtf: requeue failed; rerunning the step here (not counted as a restart)" >&2',
        "       continue ;;",
        "  esac",
        '  if [ "$restarts" -ge "$max_restarts" ]; then',
        '    echo "dtf: step failed with status $status; giving up after $restarts restart(s)" >&2',
        "    exit $status",
        "  fi",
        "  restarts=$((restarts + 1))",
        '  echo "dtf: step failed with status $status; rerunning (restart $restarts of $max_restarts)" >&2',
        "done"]


def _evaluator_wait_lines(never: str) -> List[str]:
    """After the workers: wait for the evaluator, rerunning it after failures (it shares the restart budget)."""
    return ["# The workers are done: the job is done once the evaluator has scored the last checkpoint.",
            "while true; do",
            '  wait "$evaluator" && exit 0',
            "  status=$?",
            "  case $status in",
            f'    {never}) echo "dtf: evaluator exited with status $status (user error); not rerunning" >&2',
            "       exit $status ;;",
            "  esac",
            '  if [ "$restarts" -ge "$max_restarts" ]; then',
            '    echo "dtf: evaluator failed with status $status; giving up after $restarts restart(s)" >&2',
            "    exit $status",
            "  fi",
            "  restarts=$((restarts + 1))",
            '  echo "dtf: evaluator failed with status $status; rerunning it (restart $restarts of '
            '$max_restarts)" >&2',
            "  run_evaluator &",
            "  evaluator=$!",
            "done"]


def sbatch(command: Sequence[str], num_workers: int, *, job_name: str, nodes: Optional[int] = None,
           tasks_per_node: Optional[int] = None, gres: Optional[str] = None, time: Optional[str] = None,
           timeout_s: Optional[float] = None, partition: Optional[str] = None, output: Optional[str] = None,
           max_restarts: Optional[int] = None, evaluator: Optional[Sequence[str]] = None,
           data_service_workers: Optional[int] = None) -> str:
    """The sbatch script running `command` as `num_workers` tasks in one srun step (and `evaluator`, if given, as a
    step beside it; with `data_service_workers`, a tf.data service for the job); see the module doc.

    `time` is Slurm's time limit; `timeout_s` (the launcher's --timeout) is the same limit in seconds. `nodes` may be
    a range 'MIN-MAX' (then `num_workers` is MAX × tasks_per_node; see the module doc)."""
    fewest, most = node_range(nodes)
    most, tasks_per_node = layout(num_workers, most, tasks_per_node)
    elastic = fewest is not None and fewest < most
    limit_s, gpus = _check_options(tasks_per_node, gres, time, timeout_s, partition, output)
    directives = _directives(job_name, f"{fewest}-{most}" if elastic else str(most), tasks_per_node, gres, time,
                             limit_s, partition, output)
    step = _workers_step(command, most, tasks_per_node, gpus, data_service_workers, elastic)
    never = "|".join(str(s) for s in exitcodes.NEVER_RESTART)
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             "# Written by `python -m dtf.launch --emit=slurm`; submit unchanged with sbatch. Task 0 is the chief;",
             "# output lines are prefixed with the task number. Reruns follow dtf.base.exitcodes (see",
             "# dtf/backends/slurm.py).",
             "set -u",
             "steplog=$(mktemp)  # each step's output (also in the job log): which task failed first, and how",
             "trap 'rm -f \"$steplog\"' EXIT",
             *_data_service_lines(data_service_workers),
             f"max_restarts={max_restarts or 0}",
             "restarts=0",
             "start=${SLURM_RESTART_COUNT:-0}  # a requeued job starts on other ports too",
             *(_evaluator_start_lines(evaluator) if evaluator else []),
             *_workers_loop_lines(step, never, "break" if evaluator else "exit 0")]
    if evaluator:
        lines += _evaluator_wait_lines(never)
    return "\n".join(lines) + "\n"


def _data_service_lines(workers: Optional[int]) -> list:
    """A tf.data service for the job's lifetime (dtf.cluster.data_service): a dispatcher and `workers` workers as
    background steps on the first node, on ports 11000-11999 (below the workers' block, see
    dtf.cluster.tf_config.slurm_port), checked before training and stopped when the script exits."""
    if not workers:
        return []
    if workers > 19:
        raise UserError(f"--data_service_workers={workers} is over 19, the ports dtf gives the service of one job")
    serve = 'srun --overlap --nodes=1 --ntasks=1 -w "$ds_host" python -m dtf.cluster.data_service'
    return ["ds_host=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
            "ds_port=$((11000 + SLURM_JOB_ID % 50 * 20))  # the dispatcher; worker i on ds_port + i",
            f"{serve} dispatcher \"$ds_port\" &",
            f"for i in $(seq {workers}); do",
            f'  {serve} worker "$((ds_port + i))" "$ds_host:$ds_port" "$ds_host" &',
            "done",
            "trap 'rm -f \"$steplog\"; kill $(jobs -p) 2>/dev/null' EXIT",
            f'python -m dtf.cluster.data_service wait "$ds_host:$ds_port" $(for i in $(seq {workers}); do '
            'echo "$ds_host:$((ds_port + i))"; done) || exit 2']
