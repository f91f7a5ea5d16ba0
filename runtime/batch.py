"""Many images from one workflow: sweeps, job files, a manifest and ``--resume`` (``sdxl-nodes run``).

    sdxl-nodes run wf.json --sweep 2.text_g=@prompts.txt --sweep 7.seed=1..4     # cross product: 4 × lines
    sdxl-nodes run wf.json --zip --sweep 2.text_g=@prompts.txt --sweep 7.seed=@seeds.txt   # line by line
    sdxl-nodes run wf.json --jobs jobs.jsonl   # {"2.text_g": "a cat", "7.seed": 3} per line
    sdxl-nodes run wf.json --jobs jobs.jsonl --resume   # skip the jobs the manifest says are done

A job is a list of ``NODE_ID.INPUT=VALUE`` overrides, the form of ``--set``; they are applied to the
workflow (after any ``--set``) by :func:`.cli.apply_overrides`. Every job is checked by the validator
before the first one runs. Jobs then run one after another through one :class:`.executor.Executor`,
so its cache keeps the loaded models and whatever did not change between two jobs (a new seed re-runs
the sampler and what follows it; the loaders and text encoders never re-run for it).

``--batch N`` runs up to N consecutive jobs that differ only in seeds and texts (the graph and every other
literal equal) as one execution (:meth:`.executor.Executor.execute_batch`): text encoders run per distinct
prompt, the sampler puts the jobs in one UNet batch (each with its own noise), and each job saves its own
files under the names an unbatched run gives them. The pixels equal the unbatched run's (on the CPU bit for
bit; see ``sdxl_core.sampling.sample_batch``).

``<output-dir>/manifest.jsonl`` gets one JSON line per finished job (``job``, ``key``, ``overrides``,
``seed``, ``files``, ``seconds``, ``status`` = done | failed | interrupted, ``error``), flushed and
fsynced before the next job starts. ``key`` identifies a job by its overrides: ``--resume`` skips a job
when the last line with its key says done and all its files exist.

Torch-free: the node pack is reached through :mod:`.cli`'s loaders only.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    CLIError,
    apply_overrides,
    apply_overrides_to_ui,
    format_errors,
    node_pack,
    object_info_for,
)
from .validate import is_link, validate_prompt
from .workflow import LoadedWorkflow

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
MAX_ERRORS_SHOWN = 20
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_TARGET = re.compile(r"^[^.=\s]+\.[^=\s]+$")
SEED_INPUTS = ("seed", "noise_seed")


@dataclass
class Job:
    """One run of the workflow: ``overrides`` in ``--set`` form, ``origins`` say where each came from."""

    number: int  # 1-based, in the order jobs run
    overrides: list[str]
    origins: list[str]
    key: str = ""
    prompt: dict = field(default_factory=dict)
    extra_data: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.key:
            self.key = job_key(self.overrides)

    def where(self) -> str:
        return f"job {self.number}" + (f" ({', '.join(self.origins)})" if self.origins else "")

    def override_values(self) -> dict[str, Any]:
        values = {}
        for item in self.overrides:
            target, _, raw = item.partition("=")
            values[target] = _parse_set_value(raw)
        return values


def job_key(overrides: list[str]) -> str:
    return hashlib.sha256(json.dumps(overrides, ensure_ascii=False).encode()).hexdigest()[:16]


def _parse_set_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


# ------------------------------------------------------------------------------------------------
# Expanding --sweep / --zip / --jobs into jobs


def _check_target(target: str, where: str) -> None:
    if not _TARGET.match(target):
        raise CLIError(f"{where}: expected NODE_ID.INPUT=VALUES, e.g. --sweep 7.seed=1..4")


def _file_value(line: str) -> str:
    """A line of an @file as a --set value: numbers stay numbers, anything else is the exact text."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return json.dumps(line, ensure_ascii=False)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return line
    return json.dumps(line, ensure_ascii=False)


def sweep_values(spec: str, base_dir: Path | None = None) -> tuple[str, list[tuple[str, str]]]:
    """``(NODE_ID.INPUT, [(override, origin), ...])`` of one ``--sweep NODE_ID.INPUT=VALUES``.

    VALUES: ``a..b`` (integers a to b, both included), ``@file`` (one value per line; blank lines are
    skipped), a JSON list, or a single literal (as ``--set``).
    """
    target, sep, raw = spec.partition("=")
    where = f"--sweep {spec!r}"
    _check_target(target, where)
    if not sep or raw == "":
        raise CLIError(f"{where}: no values after '='; use a..b, @file, a JSON list or one value")
    values: list[tuple[str, str]] = []
    if m := _RANGE.match(raw):
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise CLIError(f"{where}: range {raw} is empty ({b} < {a}); write the smaller number first")
        values = [(str(v), f"{target}={v}") for v in range(a, b + 1)]
    elif raw.startswith("@"):
        path = Path(raw[1:])
        if base_dir is not None and not path.is_absolute() and not path.exists():
            path = base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"{where}: cannot read {path}: {e}") from e
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line:
                values.append((_file_value(line), f"{path.name} line {n}"))
        if not values:
            raise CLIError(f"{where}: {path} has no values (one value per line)")
    elif raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CLIError(f"{where}: not a valid JSON list ({e})") from e
        if not isinstance(items, list) or not items:
            raise CLIError(f"{where}: expected a non-empty JSON list like [1, 2, 3]")
        values = [(json.dumps(v, ensure_ascii=False), f"{target} value {i}") for i, v in enumerate(items, 1)]
    else:
        values = [(raw, f"{target}={raw}")]
    return target, [(f"{target}={v}", origin) for v, origin in values]


def read_jobs_file(path: str | Path) -> list[tuple[list[str], str]]:
    """``[(overrides, origin)]`` of a JSONL file: one ``{"NODE_ID.INPUT": value, ...}`` object per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--jobs: cannot read {path}: {e}") from e
    jobs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected one object like "
                           '{"7.seed": 3, "2.text_g": "a cat"} per line') from e
        if not isinstance(obj, dict):
            raise CLIError(f"{where}: expected a JSON object of NODE_ID.INPUT keys, got {type(obj).__name__}")
        overrides = []
        for target, value in obj.items():
            _check_target(target, f"{where}: key {target!r}")
            overrides.append(f"{target}={json.dumps(value, ensure_ascii=False)}")
        jobs.append((overrides, where))
    if not jobs:
        raise CLIError(f"--jobs: {path} has no jobs (one JSON object per line)")
    return jobs


def expand_jobs(sweeps: Iterable[str] = (), *, zip_sweeps: bool = False, jobs_file: str | Path | None = None,
                base_dir: Path | None = None) -> list[Job]:
    """The job list: job-file lines × the sweeps' cross product (or their line-by-line zip)."""
    parsed = [sweep_values(s, base_dir) for s in sweeps]
    targets = [t for t, _ in parsed]
    if len(set(targets)) != len(targets):
        dup = next(t for t in targets if targets.count(t) > 1)
        raise CLIError(f"--sweep {dup} is given twice; put all its values in one --sweep")
    columns = [vals for _, vals in parsed]
    if zip_sweeps:
        if not columns:
            raise CLIError("--zip pairs --sweep values line by line; give at least one --sweep")
        lengths = {t: len(v) for t, v in parsed}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{t} has {n}" for t, n in lengths.items())
            raise CLIError(f"--zip needs sweeps of the same length: {shown} values")
        combos = list(zip(*columns))
    else:
        combos = list(itertools.product(*columns))
    file_jobs = read_jobs_file(jobs_file) if jobs_file else [([], None)]
    jobs = []
    seen: dict[str, int] = {}
    for (file_overrides, file_origin), combo in itertools.product(file_jobs, combos):
        overrides = list(file_overrides) + [o for o, _ in combo]
        origins = ([file_origin] if file_origin else []) + [origin for _, origin in combo]
        key = job_key(overrides)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # the same overrides asked for again (a repeated line): its own manifest entry
            key = f"{key}-{seen[key]}"
        jobs.append(Job(len(jobs) + 1, overrides, origins, key))
    return jobs


# ------------------------------------------------------------------------------------------------
# Preparing and validating every job up front


def prepare_jobs(loaded: LoadedWorkflow, jobs: list[Job], classes, info: dict) -> list[str]:
    """Fill each job's prompt and extra_data; return the error messages (empty: every job is valid)."""
    errors: list[str] = []
    base_extra = loaded.default_extra_data()
    seen: dict[str, str | None] = {}  # validation result per distinct prompt
    for job in jobs:
        prompt = copy.deepcopy(loaded.prompt)
        try:
            apply_overrides(prompt, job.overrides)
        except CLIError as e:
            errors.append(f"{job.where()}: {str(e).replace('--set ', '', 1)}")
            continue
        text = json.dumps(prompt, sort_keys=True)
        if text not in seen:
            ok, error, node_errors, _outputs = validate_prompt(prompt, classes)
            seen[text] = None if ok else format_errors(error, node_errors, prompt)
        if seen[text] is not None:
            errors.append(f"{job.where()}:\n  " + seen[text].replace("\n", "\n  "))
            continue
        job.prompt = prompt
        extra = copy.deepcopy(base_extra)
        workflow = (extra.get("extra_pnginfo") or {}).get("workflow")
        if workflow is not None and job.overrides:
            apply_overrides_to_ui(workflow, job.overrides, info)
        job.extra_data = extra
    return errors


def job_seeds(prompt: dict) -> dict[str, Any]:
    """``{node_id: seed}`` of every node with a literal seed input."""
    seeds = {}
    for node_id, node in prompt.items():
        for name in SEED_INPUTS:
            value = (node.get("inputs") or {}).get(name)
            if value is not None and not isinstance(value, list):
                seeds[node_id] = value
    return seeds


def batch_key(prompt: dict, info: dict) -> str:
    """What jobs must share to run as one batch (``--batch``): the graph and every literal input except seeds
    and text (STRING) inputs."""
    blanked = {}
    for node_id, node in prompt.items():
        spec = (info.get(node.get("class_type")) or {}).get("input") or {}
        types = {name: (opts[0] if isinstance(opts, (list, tuple)) and opts else opts)
                 for category in ("required", "optional") for name, opts in (spec.get(category) or {}).items()}
        inputs = {name: "<varies>" if not is_link(value) and (name in SEED_INPUTS or types.get(name) == "STRING")
                  else value for name, value in (node.get("inputs") or {}).items()}
        blanked[node_id] = [node.get("class_type"), inputs]
    return json.dumps(blanked, sort_keys=True, default=repr)


def prefixes_clash(prompt: dict) -> bool:
    """Whether two nodes save under the same ``filename_prefix``: their files are numbered in the order the nodes
    run, and a batch runs each node for all its jobs before the next node, so the numbers would change."""
    prefixes = [v for node in prompt.values() if isinstance(v := (node.get("inputs") or {}).get("filename_prefix"), str)]
    return len(prefixes) != len(set(prefixes))


def group_jobs(jobs: list[Job], size: int, info: dict) -> list[list[Job]]:
    """Consecutive jobs with the same :func:`batch_key`, at most ``size`` a group (job order is kept, so the
    files get the numbers of an unbatched run); none when two save nodes share a prefix."""
    if size > 1 and jobs and prefixes_clash(jobs[0].prompt):
        log.warning("--batch: two save nodes share a filename_prefix, so the jobs run one at a time (batched, "
                    "their files would be numbered in another order); give each save node its own prefix")
        size = 1
    groups: list[list[Job]] = []
    last = None
    for job in jobs:
        key = batch_key(job.prompt, info) if size > 1 else None
        if groups and key == last and len(groups[-1]) < size:
            groups[-1].append(job)
        else:
            groups.append([job])
        last = key
    return groups


# ------------------------------------------------------------------------------------------------
# The manifest


class Manifest:
    """``manifest.jsonl``: appended one whole line per job, flushed and fsynced, so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def records(self) -> list[dict]:
        """Every complete line; a torn last line (a crash while writing it) is ignored."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete (an earlier run stopped while writing it); ignored",
                            self.path, n)
        return out

    def done_keys(self, output_dir: Path) -> set[str]:
        """Keys whose latest line says done and whose files all exist."""
        latest: dict[str, dict] = {}
        for rec in self.records():
            if isinstance(rec, dict) and "key" in rec:
                latest[rec["key"]] = rec
        return {k for k, rec in latest.items()
                if rec.get("status") == "done" and all((output_dir / f).is_file() for f in rec.get("files", []))}

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:  # a line torn by a crash must not swallow this one
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())


def make_record(job: Job, status: str, files: list[str], seconds: float, error: str | None,
                worker: str | None = None, batch: int = 1) -> dict:
    record = {"job": job.number, "key": job.key, "overrides": job.override_values(), "seed": job_seeds(job.prompt),
              "files": files, "seconds": round(seconds, 3), "status": status, "error": error}
    if batch > 1:
        record["batch"] = batch  # run in one execution with batch - 1 other jobs; seconds is its share
    if worker is not None:
        record["worker"] = worker  # Ray runs: which worker process made it (host:pid)
    return record


# ------------------------------------------------------------------------------------------------
# Running jobs


def error_text(result) -> str:
    err = result.error or {}
    if result.status == "interrupted":
        return f"interrupted at node {err.get('node_id')} ({err.get('node_type')})"
    return f"node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}"


def output_files(result) -> list[str]:
    files = []
    for ui in result.outputs.values():
        for img in (ui or {}).get("images", []):
            if img.get("type") == "output":
                files.append((Path(img.get("subfolder") or "") / img["filename"]).as_posix())
    return files


class JobRunner:
    """Runs prepared jobs one at a time through one executor (models stay loaded between jobs)."""

    def __init__(self, classes, on_event: Callable[[str, dict], None] | None = None):
        from .executor import Executor

        self.executor = Executor(classes, on_event=on_event)

    def run(self, job: Job) -> tuple[str, list[str], float, str | None]:
        """``(status, output files relative to the output folder, seconds, error)``."""
        t0 = time.perf_counter()
        result = self.executor.execute(job.prompt, str(uuid.uuid4()), extra_data=job.extra_data)
        seconds = time.perf_counter() - t0
        status = {"success": "done", "error": "failed"}.get(result.status, "interrupted")
        return status, output_files(result), seconds, None if status == "done" else error_text(result)

    def run_group(self, jobs: list[Job]) -> list[tuple[str, list[str], float, str | None]]:
        """:meth:`run` for each job of a ``--batch`` group, as one execution; ``seconds`` is the group's time
        shared out. A node failing in the batch re-runs the group's jobs one by one, so that the failure is
        recorded for the job that caused it (what the others computed is cached)."""
        if len(jobs) == 1:
            return [self.run(jobs[0])]
        t0 = time.perf_counter()
        results = self.executor.execute_batch([j.prompt for j in jobs], str(uuid.uuid4()),
                                              extra_datas=[j.extra_data for j in jobs])
        seconds = (time.perf_counter() - t0) / len(jobs)
        status = {"success": "done", "error": "failed"}.get(results[0].status, "interrupted")
        if status == "failed":
            log.warning("a batch of %d jobs failed (%s); running them one by one to find which",
                        len(jobs), error_text(results[0]))
            return [self.run(job) for job in jobs]
        return [(status, output_files(r), seconds, None if status == "done" else error_text(r)) for r in results]

    def interrupt(self) -> None:
        self.executor.interrupt()


class BatchProgress:
    """One overall bar (jobs done/total, images/min, ETA) and, unless quiet, a bar per sampler under it."""

    def __init__(self, total: int, done: int, prompt_titles: dict, quiet: bool):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.quiet = quiet
        self.titles = prompt_titles
        self.images = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, initial=done, desc="jobs", unit="job", file=sys.stderr, position=0,
                        dynamic_ncols=True, leave=True)
        self.step_bar = None
        self.step_node = None

    def job_finished(self, files: int) -> None:
        self.images += files
        minutes = (time.perf_counter() - self.t0) / 60
        self.bar.set_postfix_str(f"{self.images / minutes:.1f} img/min" if minutes > 0 else "")
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close_steps(self) -> None:
        if self.step_bar is not None:
            self.step_bar.close()
            self.step_bar = self.step_node = None

    def __call__(self, event: str, data: dict) -> None:  # executor events (local runs)
        if self.quiet:
            return
        if event == "progress":
            node = data.get("node")
            if self.step_bar is None or self.step_node != node:
                self.close_steps()
                self.step_bar = self._tqdm(total=data["max"], desc=f"  {self.titles.get(node, node)} [{node}]",
                                           unit="step", file=sys.stderr, position=1, leave=False,
                                           dynamic_ncols=True)
                self.step_node = node
            self.step_bar.n = data["value"]
            self.step_bar.refresh()
        elif event in ("executing", "execution_success", "execution_error", "execution_interrupted"):
            if event != "executing" or data.get("node") != self.step_node:
                self.close_steps()

    def close(self) -> None:
        self.close_steps()
        self.bar.close()


def finish(total: int, failed: int, interrupted: bool, manifest: Manifest, done: int) -> int:
    if interrupted:
        print(f"interrupted: {done} of {total} jobs done; the manifest is intact ({manifest.path}); "
              "run again with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        print(f"{failed} of {total} jobs failed (see {MANIFEST_NAME})", file=sys.stderr)
        return EXIT_FAILED
    print(f"{total} of {total} jobs done (manifest: {manifest.path})")
    return EXIT_OK


def run_local(groups: list[list[Job]], classes, manifest: Manifest, progress: BatchProgress) -> tuple[int, bool, int]:
    """Run the job groups (one job each unless ``--batch``) in a worker thread (Ctrl-C lands in this one);
    returns ``(failed, interrupted, done)``."""
    runner = JobRunner(classes, on_event=progress)
    stop = threading.Event()
    state = {"failed": 0, "done": 0}

    finished = threading.Event()

    def work():
        if hasattr(signal, "pthread_sigmask"):  # Ctrl-C goes to the main thread only, never into torch's threads
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for group in groups:
                if stop.is_set():
                    return
                for job, (status, files, seconds, error) in zip(group, runner.run_group(group)):
                    if status == "interrupted" and not stop.is_set():
                        status = "failed"  # a node raised Interrupted on its own
                    manifest.append(make_record(job, status, files, seconds, error, batch=len(group)))
                    if status == "failed":
                        state["failed"] += 1
                        progress.write(f"{job.where()} failed: {error}")
                    elif status == "done":
                        state["done"] += 1
                    if status != "interrupted":
                        progress.job_finished(len(files))
                if stop.is_set():
                    return
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="sdxl-nodes-batch", daemon=True)
    worker.start()
    interrupted = False
    # Poll with sleep: a Ctrl-C that lands inside Thread.join() can leave the thread looking finished
    # while it still runs (CPython), and then the process exits under a running torch op and aborts.
    while not finished.is_set():
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            if not interrupted:
                progress.write("interrupting: the job in progress stops after this step…")
            interrupted = True
            stop.set()
            runner.interrupt()
    worker.join()
    return state["failed"], interrupted, state["done"]


def run_batch(args, loaded: LoadedWorkflow) -> int:
    """``sdxl-nodes run`` with ``--sweep``/``--jobs``/``--ray``: expand, validate all, run, record."""
    classes, names = node_pack()
    size = getattr(args, "batch", 1)
    if size < 1:
        raise CLIError(f"--batch {size}: give the number of jobs per batch, 1 or more (1 = one job at a time)")
    if size > 1 and not (args.sweep or args.jobs):
        raise CLIError("--batch N groups the jobs of --sweep or --jobs; give one of them (a single run is one job)")
    jobs = expand_jobs(args.sweep or [], zip_sweeps=args.zip, jobs_file=args.jobs)
    info = object_info_for(classes, names)
    errors = prepare_jobs(loaded, jobs, classes, info)
    if errors:
        for text in errors[:MAX_ERRORS_SHOWN]:
            print(f"error: {text}", file=sys.stderr)
        more = f" (first {MAX_ERRORS_SHOWN} shown)" if len(errors) > MAX_ERRORS_SHOWN else ""
        print(f"{len(errors)} of {len(jobs)} jobs are invalid{more}; nothing was run", file=sys.stderr)
        return EXIT_INVALID
    output_dir = Path(args.output_dir)
    manifest = Manifest(output_dir / MANIFEST_NAME)
    skip = manifest.done_keys(output_dir) if args.resume else set()
    todo = [j for j in jobs if j.key not in skip]
    if skip:
        print(f"--resume: {len(jobs) - len(todo)} of {len(jobs)} jobs already done; running {len(todo)}")
    titles = {nid: (n.get("_meta") or {}).get("title") or n.get("class_type", nid) for nid, n in loaded.prompt.items()}
    groups = group_jobs(todo, size, info)
    if size > 1:
        print(f"--batch {size}: {len(todo)} jobs in {len(groups)} executions")
    progress = BatchProgress(len(jobs), len(jobs) - len(todo), titles, args.quiet)
    try:
        if args.ray:
            from .batch_ray import run_ray

            failed, interrupted, done = run_ray(groups, args, manifest, progress)
        else:
            failed, interrupted, done = run_local(groups, classes, manifest, progress)
    finally:
        progress.close()
    return finish(len(jobs), failed, interrupted, manifest, len(jobs) - len(todo) + done)
