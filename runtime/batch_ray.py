"""``sdxl-nodes run --ray ADDRESS``: the batch's job list spread over a Ray cluster.

Ray's batch-inference pattern: a pool of long-lived actors, each loading the models once (from its own
``--models-dir``) and running jobs through the same :class:`.batch.JobRunner` as a local batch. Each
actor asks for one GPU when the cluster has GPUs, CPUs otherwise; Ray places them. A result (the PNG
bytes and the job's record) comes back to the driver, which writes the PNGs and ``manifest.jsonl``, so
the workers need no shared filesystem.

Fault handling is Ray's: actors are created with ``max_restarts=-1`` and ``max_task_retries=2``, so a
worker process that dies mid-job is restarted (loading the models again) and its job is retried up to
two times; after that Ray raises ``RayActorError`` and the job is recorded as failed.

The dispatch loop below is what ``ray.util.ActorPool.get_next_unordered`` does (give the next job to an
idle actor, wait for any result); it is written out because ActorPool does not say *which* job a
``RayActorError`` belongs to, and the manifest must.

Ray is optional (``pip install 'sdxl-nodes[ray]'``); this module imports it only when called.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import tempfile
import uuid
from pathlib import Path

from ..paths import inside
from .batch import BatchProgress, Job, JobRunner, Manifest, make_record
from .cli import CLIError

log = logging.getLogger(__name__)

MAX_TASK_RETRIES = 2
WORKER_NAME = "sdxl-nodes-worker-{}-{}"  # run id, index: named so that tools (and tests) can find them
NAMESPACE = "sdxl-nodes"
_NUMBERED = re.compile(r"^(.*)_(\d{5,})_\.png$")


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise CLIError("--ray needs Ray on this machine and on every worker: pip install 'sdxl-nodes[ray]'") from e
    return ray


class Worker:
    """A Ray actor (made remote in :func:`run_ray`): one environment, one executor, models loaded once."""

    def __init__(self, settings: dict):
        from . import cli

        self.root = Path(tempfile.mkdtemp(prefix="sdxl-nodes-ray-"))
        args = argparse.Namespace(**settings, output_dir=str(self.root / "output"), temp_dir=str(self.root / "temp"))
        cli.build_environment(args)
        classes, _names = cli.node_pack()
        self.runner = JobRunner(classes)

    def run(self, job: Job) -> dict:
        return self.run_group([job])[0]

    def run_group(self, jobs: list[Job]) -> list[dict]:
        """One result per job of a ``--batch`` group (a group of one without ``--batch``)."""
        results = []
        for status, files, seconds, error in self.runner.run_group(jobs):
            out = []
            for rel in files:
                path = self.root / "output" / rel
                out.append({"path": rel, "data": path.read_bytes()})
                path.unlink()  # the driver keeps the file; the worker keeps nothing
            results.append({"status": status, "files": out, "seconds": seconds, "error": error,
                            "worker": f"{socket.gethostname()}:{os.getpid()}"})
        return results


def place_file(output_dir: Path, rel: str, data: bytes) -> str:
    """Write a worker's PNG under the driver's output folder with the next free number; returns its path."""
    sub, _, name = rel.rpartition("/")
    folder = inside(output_dir, sub, allow_root=True) if sub else Path(os.path.realpath(output_dir))
    if folder is None:
        raise CLIError(f"a worker returned the file {rel!r}, which is outside the output folder {output_dir}")
    folder.mkdir(parents=True, exist_ok=True)
    m = _NUMBERED.match(name)
    stem = m.group(1) if m else name.removesuffix(".png")
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})_\.png$")
    counter = max((int(mm.group(1)) for p in folder.glob(f"{stem}_*_.png") if (mm := pattern.match(p.name))),
                  default=0) + 1
    target = folder / f"{stem}_{counter:05}_.png"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)  # never a half-written PNG under its real name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target.relative_to(Path(os.path.realpath(output_dir))).as_posix()


def worker_settings(args) -> dict:
    """What each worker needs to build its environment; local folders that exist are made absolute."""
    def folder(p):
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    return {"models_dir": folder(args.models_dir), "input_dir": folder(args.input_dir), "device": args.device,
            "dtype": args.dtype, "vae_dtype": args.vae_dtype, "compile": getattr(args, "compile", None)}


CLIENT_SERVER_RETRIES = 2  # a head's per-client server sometimes dies as it starts (a fork beside gRPC threads)


def connect(ray, address: str) -> None:
    if ray.is_initialized():
        return
    try:
        if address == "local":
            # "local": always a new cluster of our own, never one a `ray start` left on this machine
            ray.init(address="local", namespace=NAMESPACE, log_to_driver=False)
            return
        for attempt in range(CLIENT_SERVER_RETRIES + 1):
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
                return
            except (ConnectionError, RuntimeError) as e:
                # seen with Ray 2.60: "Starting Ray client server failed" on a healthy head; the next try works
                if "client server failed" not in str(e) or attempt == CLIENT_SERVER_RETRIES:
                    raise
                log.warning("--ray %s: the head could not start a client server for us (%s); trying again",
                            address, str(e).strip().splitlines()[-1][:200])
                shutdown = getattr(ray, "shutdown", None)
                if shutdown is not None:
                    shutdown()  # leave no half-made client connection behind the next try
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ""
        if not os.environ.get("RAY_AUTH_MODE") and address != "local":
            # recent Ray (2.60 here) starts heads with token authentication; a client without RAY_AUTH_MODE=token sends
            # no token and the head drops the connection (the client only sees a timeout)
            hint = (" If the cluster uses token authentication (the default of `ray start --head` in recent Ray, "
                    "e.g. 2.60), set RAY_AUTH_MODE=token here and make its token available (~/.ray/auth_token, "
                    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN).")
        raise CLIError(f"--ray {address}: could not connect to a Ray cluster ({e}). Start one with "
                       "`ray start --head`, pass its address (ray://HOST:10001), or use --ray local." + hint) from e


def actor_options(ray, count: int | None) -> tuple[int, dict]:
    """``(number of workers, actor options)``: one per GPU, else one per node, sharing the CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return count or gpus, {"num_gpus": 1}
    node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1]
    n = count or len(node_cpus)
    per_node = -(-n // len(node_cpus))  # workers per machine, rounded up
    # sized for the smallest machine, so that every worker can be placed (a worker Ray cannot place would
    # hold its job forever)
    return n, {"num_cpus": max(1, min(node_cpus) // per_node)}


def run_ray(groups: list[list[Job]], args, manifest: Manifest, progress: BatchProgress) -> tuple[int, bool, int]:
    """Run the job groups (one job each unless ``--batch``: then a group is one task, run by one worker as one
    batch, and retried as a whole) on Ray; the driver writes files and manifest. Returns
    ``(failed, interrupted, done)``."""
    ray = import_ray()
    from ray.exceptions import RayActorError, RayError

    if not groups:
        return 0, False, 0
    connect(ray, args.ray)
    n, options = actor_options(ray, args.ray_workers)
    settings = worker_settings(args)
    if options.get("num_gpus"):
        settings["device"] = "cuda"  # Ray gives each worker one GPU (CUDA_VISIBLE_DEVICES): it is cuda:0 there
    remote = ray.remote(max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)(Worker)
    n = min(n, len(groups))
    run_id = uuid.uuid4().hex[:8]
    actors = [remote.options(name=WORKER_NAME.format(run_id, i), namespace=NAMESPACE, **options).remote(settings)
              for i in range(n)]
    output_dir = Path(args.output_dir)
    pending = list(reversed(groups))
    inflight: dict = {}  # ObjectRef -> (group, actor)
    idle = list(actors)
    failed = done = 0
    try:
        while pending or inflight:
            while idle and pending:
                actor, group = idle.pop(), pending.pop()
                inflight[actor.run_group.remote(group)] = (group, actor)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)  # short: Ctrl-C stays prompt
            for ref in ready:
                group, actor = inflight.pop(ref)
                idle.append(actor)
                try:
                    results = ray.get(ref)
                except RayActorError as e:
                    results = [{"status": "failed", "files": [], "seconds": 0.0,
                                "error": f"the worker died running this job ({MAX_TASK_RETRIES} retries used): {e}"}
                               ] * len(group)
                except RayError as e:
                    results = [{"status": "failed", "files": [], "seconds": 0.0, "error": f"Ray error: {e}"}] * len(group)
                for job, res in zip(group, results):
                    files = [place_file(output_dir, f["path"], f["data"]) for f in res["files"]]
                    manifest.append(make_record(job, res["status"], files, res["seconds"], res["error"],
                                                res.get("worker"), batch=len(group)))
                    if res["status"] == "done":
                        done += 1
                    else:
                        failed += 1
                        progress.write(f"{job.where()} failed: {res['error']}")
                    progress.job_finished(len(files))
    except KeyboardInterrupt:
        progress.write("interrupting: stopping the Ray workers…")
        for group, _actor in inflight.values():
            for job in group:
                manifest.append(make_record(job, "interrupted", [], 0.0, "interrupted (Ctrl-C)", batch=len(group)))
        return failed, True, done
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return failed, False, done
