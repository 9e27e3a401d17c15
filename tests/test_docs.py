"""Docs are tests: README.md's commands, in order, from a fresh copy of the repository (tests/docs_harness.py says
what is changed and why; README.md's "How the docs are tested" says the same to readers, checked here)."""
import os
import re
import time

import pytest

import docs_harness as h


def _section(doc: str, title: str) -> str:
    text = open(os.path.join(h.REPO, doc), encoding="utf-8").read()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"{doc} has no section {title!r}"
    return match.group(1)


def test_readme_says_what_the_harness_changes():
    """Every shortening flag, placeholder and replaced command is named in README.md's "How the docs are tested"
    (and the README names nothing the harness does not do), so the two cannot drift."""
    text = _section("README.md", "How the docs are tested")
    spans = re.findall(r"`([^`]+)`", text)
    tokens = {token for span in spans for token in span.split()}
    flags = {flag for flags in h.SHORTEN.values() for flag in flags.split()}
    assert sorted(flags - tokens) == [], "appended by tests/docs_harness.py but not named in README.md"
    assert sorted(t for t in tokens if t.startswith("--") and "=" in t and t not in flags) == [], \
        "named in README.md but not appended by tests/docs_harness.py"
    declared = [old for old, _, _ in h.SUBSTITUTIONS] + [k for k in h.PYTHON_BLOCKS] + [
        "pip install", "python -m pytest", "sbatch", "kubectl apply", "kubectl get", "tensorboard --inspect",
        "# exits N"]
    assert [d for d in declared if not any(d in span for span in spans)] == []


def test_every_declared_change_is_used():
    """No stale entries: each placeholder and replacement matches a documented command, each python block key one
    block, and every training command is shortened."""
    steps = h.all_steps()
    written = [s.written for s in steps]
    for old, _, _ in h.SUBSTITUTIONS:
        assert any(old in w for w in written), f"SUBSTITUTIONS: {old!r} is in no documented command"
    parts = [p for w in written for p in h.split_and(w)]
    for pattern, _, _ in h.REPLACED:
        assert any(re.match(pattern, p) for p in parts), f"REPLACED: {pattern!r} matches no documented command"
    for key in h.PYTHON_BLOCKS:
        assert any(w.startswith(key) for w in written), f"PYTHON_BLOCKS: no block starts with {key!r}"
    for step in steps:
        for match in h.TRAINING.finditer(step.command or ""):
            tail = step.command[match.end():]
            assert "--help" in tail or h.SHORTEN[match.group(1)] in tail, step


def test_extraction_reads_commands_as_bash_would(tmp_path, monkeypatch):
    monkeypatch.setattr(h, "REPO", str(tmp_path))
    (tmp_path / "x.md").write_text("text\n```bash\n# a comment\nA=\"python -m dtf.run --x=1 # not a comment\"\n"
                                   "python -m dtf.launch --n=2 -- \\\n    python -m dtf.tune --f=exp.flags > out.txt"
                                   "   # to a file\npip install -e . && python -m dtf.run ...  # exits 2: no\n```\n"
                                   "```yaml\nx: 1\n```\n")
    steps = h.extract("x.md")
    assert [(s.source, s.expect) for s in steps] == [("x.md:4", 0), ("x.md:5", 0), ("x.md:7", 2)]
    run = h.SHORTEN["run"]
    assert steps[0].command == f'A="python -m dtf.run --x=1 # not a comment {run}"'
    assert steps[1].written == "python -m dtf.launch --n=2 -- python -m dtf.tune --f=exp.flags > out.txt"
    assert steps[1].command == ("python -m dtf.launch --n=2 -- python -m dtf.tune "
                                f"--f=experiments/shapes_multi_worker.flags {h.SHORTEN['tune']} > out.txt")
    assert steps[2].command == f"python -m dtf.run --flagfile=experiments/shapes_multi_worker.flags {run}"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # all commands: about 12 minutes on 2 idle cores; each has its own timeout too
def test_readme_commands_work_as_written(tmp_path, capsys):
    """Each command's exit status (0 unless marked `# exits N`), no traceback, and no trained model.keras replaced by
    a run that trained nothing; all of README.md, in order, then one report naming each failing line."""
    copy = h.fresh_copy(str(tmp_path))
    env = h.environment(copy)
    assignments, outcomes = [], []
    start = time.monotonic()
    for step in h.all_steps():
        outcome = h.run_step(step, copy, env, assignments)
        outcomes.append(outcome)
        mark = "skip" if outcome.status is None and not step.write else ("FAIL" if outcome.problems else "ok")
        with capsys.disabled():  # per-command times, also when the test passes
            lingered = f" (exited {outcome.after_last_write_s:.0f}s after its last write)" \
                if (outcome.after_last_write_s or 0) > 10 else ""
            print(f"\n{outcome.seconds:6.1f}s {mark:4} {step.source} {step.written[:100]}{lingered}", end="",
                  flush=True)
    with capsys.disabled():
        print(f"\n{time.monotonic() - start:.0f}s for {sum(o.status is not None for o in outcomes)} commands")
    failures = [f"{o.step.source}: `{o.step.written}`\n  ran: {o.step.command}\n  " + "; ".join(o.problems) +
                "\n  output (last lines):\n    " + "\n    ".join(o.output.strip().splitlines()[-15:])
                for o in outcomes if o.problems]
    assert not failures, f"{len(failures)} documented command(s) failed:\n" + "\n".join(failures)
