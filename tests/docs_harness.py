"""Docs are tests: every shell command of README.md (and docs/*.md), in the order written, run from a fresh copy of the
repository as a new user would, changed only as declared below and in README.md's "How the docs are tested"
(tests/test_docs.py checks that the two agree, so they cannot drift).

What is changed, all in this file:
- SHORTEN: flags appended to each training command (`python -m dtf.run|tune|batch_study|bench`, also after `--` of
  dtf.launch or inside a quoted command), so a command trains a few steps instead of minutes;
- SUBSTITUTIONS: placeholders the README writes for "your file" (`...`, `exp.flags`, `runs/x`) and a service the reader
  is assumed to run (`grpc://dispatcher.example:5050`), each replaced by a real one;
- REPLACED: commands that need a cluster or the network (`pip install`, `sbatch`, `kubectl`, the test suite that runs
  this harness, an open-ended `tensorboard`), each replaced by a bounded check of what the README expects, or skipped;
- PYTHON_BLOCKS: python blocks written to a file the later commands use, or skipped because they are sketches.
"""
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
TIMEOUT_S = float(os.environ.get("DTF_DOCS_TIMEOUT", "420"))  # per command

TRAINING = re.compile(r"python -m dtf\.(run|tune|batch_study|bench)\b")
SHORTEN = {
    "run": "--epochs=1 --steps_per_epoch=3 --warmup_epochs=0",
    "tune": "--epochs=1 --steps_per_epoch=3 --warmup_epochs=0 --max_trials=2",
    "batch_study": "--epochs=1 --steps_per_epoch=3 --warmup_epochs=0 --batches=32,64 --rules=none,linear",
    "bench": "--epochs=1 --steps_per_epoch=3 --warmup_epochs=0 --bench_steps=3 --bench_warmup_steps=1 "
             "--bench_repeats=1 --bench_epochs=2 --bench_replicas=1,2",
}
# (as written, replaced by, why). `{service}` is a tf.data dispatcher the harness runs for that one command.
SUBSTITUTIONS = [
    ("...", "--flagfile=experiments/shapes_multi_worker.flags", "any experiment: here the multi-worker one"),
    ("exp.flags", "experiments/shapes_multi_worker.flags", "your flagfile"),
    ("runs/x", "runs/shapes_multi_worker", "a trained run: the multi-worker one"),
    ("grpc://dispatcher.example:5050", "{service}", "a running tf.data service: dtf.cluster.data_service.local(1)"),
]
CHECK = f"python {os.path.join('tests', 'docs_harness.py')}"  # in the copy: this file, as a command-line checker
# (regex on one `&&` part, replacement or None to drop it, why)
REPLACED = [
    (r"^pip install\b.*$", None, "the test environment has every extra installed"),
    (r"^python -m pytest\b.*$", None, "the test suite runs this harness (it would run itself)"),
    (r"^sbatch (\S+)$", CHECK + r" sbatch \1", "no Slurm here: bash -n, the #SBATCH options and their directories"),
    (r"^kubectl apply -f (\S+)$", CHECK + r" tfjob \1",
     "no cluster here: the file is validated against Kubeflow's TFJob API (tests/tfjob_api.py)"),
    (r"^kubectl get\b.*$", None, "no cluster here: watching the job needs one"),
    (r"^tensorboard --logdir (\S+)$", r"tensorboard --inspect --logdir \1 | grep -A3 '^Found event files in'",
     "bounded: TensorBoard reads the event files (it must find some) and prints their digest instead of serving"),
]
PYTHON_BLOCKS = {  # first line of a python block -> file to write it to, or None (skipped: the value says why)
    "# my_task.py": "my_task.py",
    "import dtf, keras": None,  # a sketch: `keras.Sequential([...])` and `model.compile(...)` are not code
}
EXITS = re.compile(r"#\s*exits (\d+)")


@dataclasses.dataclass
class Step:
    source: str  # "README.md:123"
    written: str  # the command as written (continuations joined), or the python block's first line
    command: Optional[str] = None  # what runs; None: nothing (skipped)
    expect: int = 0
    write: Optional[Tuple[str, str]] = None  # (file name, text) for a python block
    why: str = ""  # why it was changed or skipped
    service: bool = False  # needs a tf.data dispatcher for its {service} placeholder


def _unquoted(text: str) -> List[bool]:
    """For each character: outside quotes (as bash reads them, without escapes inside quotes)."""
    out, quote = [], None
    for ch in text:
        if quote:
            out.append(False)
            quote = None if ch == quote else quote
        else:
            out.append(ch not in "'\"")
            quote = ch if ch in "'\"" else None
    return out


def strip_comment(line: str) -> Tuple[str, str]:
    """(command, comment): a `#` outside quotes at the start or after a blank starts a comment."""
    free = _unquoted(line)
    for i, ch in enumerate(line):
        if ch == "#" and free[i] and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def split_and(command: str) -> List[str]:
    free = _unquoted(command)
    parts, start = [], 0
    for i in range(len(command) - 1):
        if command[i:i + 2] == "&&" and free[i] and free[i + 1]:
            parts.append(command[start:i].strip())
            start = i + 2
    return parts + [command[start:].strip()]


def shorten(part: str) -> str:
    """Append SHORTEN to each training command in `part`: before a redirection/pipe, or inside its quotes."""
    for match in reversed(list(TRAINING.finditer(part))):
        free = _unquoted(part)
        start = match.start()
        quote = None
        for ch in part[:start]:  # the quote (if any) the command is inside
            if ch in "'\"" and quote in (None, ch):
                quote = None if quote else ch
        if quote:
            end = part.index(quote, start)
        else:
            end = next((i for i in range(start, len(part)) if free[i] and part[i] in ">|;&"), len(part))
        command = part[start:end].rstrip()
        if re.search(r"\s--help", command):
            continue
        part = part[:start] + command + " " + SHORTEN[match.group(1)] + part[start + len(command):]
    return part


def substitute(part: str) -> Tuple[str, List[str]]:
    whys = []
    for old, new, why in SUBSTITUTIONS:
        pattern = r"(?<![\w/.])" + re.escape(old) + r"(?![\w/])"
        if re.search(pattern, part):
            part = re.sub(pattern, lambda _: new, part)
            whys.append(f"{old} -> {new} ({why})")
    return part, whys


def transform(written: str) -> Tuple[Optional[str], str, bool]:
    """(command to run or None, why it differs, needs the tf.data service)."""
    parts, whys = [], []
    for part in split_and(written):
        for pattern, new, why in REPLACED:
            if re.match(pattern, part):
                whys.append(f"{part!r}: {why}")
                part = None if new is None else re.sub(pattern, new, part)
                break
        if part is None:
            continue
        part, subs = substitute(part)
        whys += subs
        parts.append(shorten(part))
    command = " && ".join(parts) or None
    return command, "; ".join(whys), bool(command and "{service}" in command)


def extract(doc: str) -> List[Step]:
    """Every step of `doc` (a path relative to REPO) in order: bash commands (a `\\` continues a line; comments are
    dropped; a trailing `# exits N` is the expected status) and python blocks."""
    lines = open(os.path.join(REPO, doc), encoding="utf-8").read().splitlines()
    steps: List[Step] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        i += 1
        if not fence or fence.group(1) not in ("bash", "python"):
            if fence:  # another language's block: skip to its end
                while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                    i += 1
                i += 1
            continue
        block_start = i
        body = []
        while not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        if fence.group(1) == "python":
            first = body[0]
            key = next((k for k in PYTHON_BLOCKS if first.startswith(k)), None)
            if key is None:
                raise ValueError(f"{doc}:{block_start + 1}: a python block tests/docs_harness.py does not know "
                                 f"({first!r}); add it to PYTHON_BLOCKS (a file to write it to, or skipped)")
            target = PYTHON_BLOCKS[key]
            write = (target, "\n".join(body) + "\n") if target else None
            steps.append(Step(f"{doc}:{block_start + 1}", first, write=write,
                              why="written to " + target if target else "a sketch, not a complete program"))
            continue
        j = 0
        while j < len(body):
            number, text = block_start + j + 1, ""
            while True:
                line = body[j] if not text else body[j].lstrip()
                j += 1
                command, comment = strip_comment(line)
                if command.endswith("\\"):
                    text += command[:-1].rstrip() + " "
                    continue
                text += command
                break
            text = text.strip()
            if not text:
                continue
            expect = EXITS.search(comment)
            command, why, service = transform(text)
            steps.append(Step(f"{doc}:{number}", text, command, int(expect.group(1)) if expect else 0, why=why,
                              service=service))
    return steps


def all_steps() -> List[Step]:
    return [step for doc in DOCS for step in extract(doc)]


# The sandbox: a copy of the repository's tracked files, and a HOME of its own.

def fresh_copy(dest: str) -> str:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    copy = os.path.join(dest, "repo")
    for name in filter(None, files.stdout.split("\0")):
        src = os.path.join(REPO, name)
        if os.path.isfile(src):  # a file deleted in the work tree but not yet in git is not there for a user either
            os.makedirs(os.path.dirname(os.path.join(copy, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(copy, name))
    os.makedirs(os.path.join(dest, "home"), exist_ok=True)
    return copy


def environment(copy: str) -> Dict[str, str]:
    home = os.path.join(os.path.dirname(copy), "home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CONFIG", "PYTEST", "DTF_"))}
    env.update(HOME=home, PYTHONPATH=copy, PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               PYTHONUNBUFFERED="1")
    return env


def models(roots: List[str]) -> Dict[str, Tuple[int, int]]:
    """Every model.keras under `roots`: (mtime_ns, size)."""
    found = {}
    for root in roots:
        for path in glob.glob(os.path.join(root, "**", "model.keras"), recursive=True):
            st = os.stat(path)
            found[path] = (st.st_mtime_ns, st.st_size)
    return found


def trained_in(model_path: str, summary_before: Optional[str]) -> bool:
    """The run that owns `model_path` wrote a new summary.json that reports training epochs."""
    summary = os.path.join(os.path.dirname(model_path), "summary.json")
    if not os.path.exists(summary):
        return False
    text = open(summary, encoding="utf-8").read()
    if text == summary_before:
        return False
    history = json.loads(text).get("history") or {}
    return bool(history.get("loss"))


@dataclasses.dataclass
class Outcome:
    step: Step
    status: Optional[int]
    seconds: float
    output: str
    problems: List[str]
    after_last_write_s: Optional[float] = None  # how long the command ran on after the last file it wrote


ASSIGNMENT = re.compile(r"""^[A-Za-z_]\w*=("[^"]*"|'[^']*'|[^\s'"]*)$""")


def run_step(step: Step, copy: str, env: Dict[str, str], assignments: List[str]) -> Outcome:
    """Run one step; a shell variable it assigns (`RUN="…"`) is added to `assignments` for the steps after it, as in
    the reader's shell."""
    if step.write:
        name, text = step.write
        with open(os.path.join(copy, name), "w", encoding="utf-8") as f:
            f.write(text)
        return Outcome(step, None, 0.0, "", [])
    if step.command is None:
        return Outcome(step, None, 0.0, "", [])
    roots = [copy, env["HOME"]]
    before = models(roots)
    summaries = {p: _read(os.path.join(os.path.dirname(p), "summary.json")) for p in before}
    command = "; ".join([*assignments, step.command])
    if ASSIGNMENT.match(step.command):
        assignments.append(step.command)
    start = time.monotonic()
    if step.service:
        from dtf.cluster import data_service

        with data_service.local(1) as service:
            status, output = _shell(command.replace("{service}", service.target), copy, env)
    else:
        status, output = _shell(command, copy, env)
    seconds = time.monotonic() - start
    last_write = _newest_mtime(roots)
    after_last_write = time.time() - last_write if last_write > time.time() - seconds else None
    problems = []
    if status != step.expect:
        problems.append(f"exit status {status}, expected {step.expect}")
    if "Traceback" in output:
        problems.append("a traceback in the output")
    after = models(roots)
    for path, stamp in before.items():
        if path in after and after[path] != stamp and not trained_in(path, summaries[path]):
            problems.append(f"{os.path.relpath(path, os.path.dirname(copy))} was replaced by a run that trained "
                            "nothing (its summary.json reports no training in this command)")
    return Outcome(step, status, seconds, output, problems, after_last_write)


def _newest_mtime(roots: List[str]) -> float:
    return max((os.stat(os.path.join(d, f)).st_mtime for root in roots for d, _, files in os.walk(root)
                for f in files if os.path.exists(os.path.join(d, f))), default=0.0)


def _read(path: str) -> Optional[str]:
    try:
        return open(path, encoding="utf-8").read()
    except OSError:
        return None


def _shell(command: str, cwd: str, env: Dict[str, str]) -> Tuple[Optional[int], str]:
    proc = subprocess.Popen(["bash", "-c", "set -o pipefail; " + command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        return None, output + f"\n[timed out after {TIMEOUT_S:g}s]"


# The checks that replace cluster commands (run in the copy as `python tests/docs_harness.py sbatch|tfjob FILE`).

def check_sbatch(path: str) -> List[str]:
    errors = []
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        errors.append(f"bash -n: {proc.stderr.strip()}")
    for line in open(path, encoding="utf-8").read().splitlines():
        if not line.startswith("#SBATCH"):
            continue
        option = re.match(r"^#SBATCH (--[a-z][a-z-]*)(=(\S+))?$", line)
        if not option:
            errors.append(f"not an sbatch option: {line!r}")
        elif option.group(1) in ("--output", "--error") and os.path.dirname(option.group(3)) and \
                not os.path.isdir(os.path.dirname(option.group(3))):
            errors.append(f"{line}: the directory {os.path.dirname(option.group(3))} does not exist")
    return errors


def check_tfjob(path: str) -> List[str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tfjob_api

    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    jobs = [d for d in docs if d.get("kind") == "TFJob"]
    return (["no TFJob in the file"] if not jobs else []) + [e for job in jobs for e in tfjob_api.validate_tfjob(job)]


if __name__ == "__main__":
    kind, file = sys.argv[1:3]
    problems = {"sbatch": check_sbatch, "tfjob": check_tfjob}[kind](file)
    for problem in problems:
        print(f"{file}: {problem}")
    print(f"{file}: {'INVALID' if problems else 'valid'} ({kind})")
    sys.exit(1 if problems else 0)
