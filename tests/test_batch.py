"""Batches: `sdxl-nodes run --sweep/--zip/--jobs/--resume/--ray` (runtime/batch.py, runtime/batch_ray.py).

* Expansion: cross product, zip, a..b ranges, @files, JSON lists, JSONL; errors name the job and line.
* One process: a new seed re-runs the sampler onwards only; each checkpoint part is read once; a
  batch job gives the same pixels as the same overrides in a plain `run --set`.
* Manifest: a failing job is recorded and the rest run (exit 1); Ctrl-C marks the job in progress
  interrupted (exit 130); after a SIGKILL, `--resume` finishes every job exactly once.
* Ray: a local 2-CPU cluster, 2 actors, one killed mid-run, ends with the local run's 12 images.
* --batch N: the same PNG bytes, names and manifest lines as one job at a time, with plain, ancestral and
  SDE samplers, in both node sets and through a base + refiner chain, with each UNet call holding the
  whole batch; jobs that cannot share a batch, and a job failing inside one, are handled job by job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS
from sdxl_nodes.runtime import cli
from sdxl_nodes.runtime.batch import Manifest, expand_jobs, read_jobs_file, sweep_values
from sdxl_nodes.runtime.cli import CLIError
from sdxl_nodes.sdxl_core import checkpoint as ckpt_module
from sdxl_nodes.sdxl_core.sampling import SampleJob, sample, sample_batch
from sdxl_nodes.sdxl_core.types import Conditioning
from sdxl_nodes.sdxl_core.unet import UNetModel

REPO = Path(__file__).resolve().parents[1]
BASE_WF = str(REPO / "workflows" / "sdxl_base.json")
SMALL = ["--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=2"]


# ------------------------------------------------------------------------------------------------
# Expansion (no models needed)


def test_cross_product_of_file_and_range(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n42\nnull\n")
    jobs = expand_jobs([f"2.text_g=@{tmp_path / 'prompts.txt'}", "7.seed=3..4"])
    assert [j.overrides for j in jobs] == [
        ['2.text_g="a cat"', "7.seed=3"], ['2.text_g="a cat"', "7.seed=4"],
        ["2.text_g=42", "7.seed=3"], ["2.text_g=42", "7.seed=4"],
        ['2.text_g="null"', "7.seed=3"], ['2.text_g="null"', "7.seed=4"],
    ]
    assert [j.number for j in jobs] == [1, 2, 3, 4, 5, 6]
    # the values the prompt receives: numbers stay numbers, other lines are their exact text
    assert [j.override_values() for j in jobs[::2]] == [
        {"2.text_g": "a cat", "7.seed": 3}, {"2.text_g": 42, "7.seed": 3}, {"2.text_g": "null", "7.seed": 3}]
    assert jobs[4].origins == ["prompts.txt line 4", "7.seed=3"]  # the blank line 2 is skipped, not renumbered
    assert len({j.key for j in jobs}) == 6
    repeated = expand_jobs(['2.text_g=["a", "a"]'])  # a repeated line is its own job for --resume
    assert repeated[0].overrides == repeated[1].overrides and repeated[0].key != repeated[1].key


def test_zip_pairs_line_by_line_and_needs_equal_lengths():
    jobs = expand_jobs(['2.text_g=["x", "y", "z"]', "7.seed=10..12"], zip_sweeps=True)
    assert [j.override_values() for j in jobs] == [
        {"2.text_g": "x", "7.seed": 10}, {"2.text_g": "y", "7.seed": 11}, {"2.text_g": "z", "7.seed": 12}]
    with pytest.raises(CLIError, match="2.text_g has 3, 7.seed has 2"):
        expand_jobs(['2.text_g=["x", "y", "z"]', "7.seed=1..2"], zip_sweeps=True)


def test_single_literal_json_list_and_bad_values():
    assert sweep_values("7.cfg=[1.5, 7]")[1] == [("7.cfg=1.5", "7.cfg value 1"), ("7.cfg=7", "7.cfg value 2")]
    assert sweep_values("9.filename_prefix=run a")[1] == [("9.filename_prefix=run a", "9.filename_prefix=run a")]
    assert [o for o, _ in sweep_values("7.seed=-1..1")[1]] == ["7.seed=-1", "7.seed=0", "7.seed=1"]
    for spec, message in (("7.seed=4..1", "empty"), ("7.seed=[1, 2", "not a valid JSON list"),
                          ("seed=1..2", "NODE_ID.INPUT"), ("7.seed=", "no values"),
                          ("7.seed=@/nonexistent/seeds.txt", "cannot read")):
        with pytest.raises(CLIError, match=message):
            sweep_values(spec)
    with pytest.raises(CLIError, match="given twice"):
        expand_jobs(["7.seed=1..2", "7.seed=3..4"])


def test_jsonl_jobs_crossed_with_a_sweep(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"2.text_g": "a cat", "7.cfg": 5.5}\n\n{"2.text_g": "a \\"dog\\""}\n')
    assert read_jobs_file(path) == [(['2.text_g="a cat"', "7.cfg=5.5"], "jobs.jsonl line 1"),
                                    (['2.text_g="a \\"dog\\""'], "jobs.jsonl line 3")]
    jobs = expand_jobs(["7.seed=1..2"], jobs_file=path)
    assert [j.override_values() for j in jobs] == [
        {"2.text_g": "a cat", "7.cfg": 5.5, "7.seed": 1}, {"2.text_g": "a cat", "7.cfg": 5.5, "7.seed": 2},
        {"2.text_g": 'a "dog"', "7.seed": 1}, {"2.text_g": 'a "dog"', "7.seed": 2}]
    assert jobs[3].where() == "job 4 (jobs.jsonl line 3, 7.seed=2)"
    path.write_text('{"7.seed": 1}\n[1, 2]\n')
    with pytest.raises(CLIError, match="jobs.jsonl line 2: expected a JSON object"):
        read_jobs_file(path)
    path.write_text('{"7.seed": 1}\n{"7.seed": 2\n')
    with pytest.raises(CLIError, match="jobs.jsonl line 2: not valid JSON"):
        read_jobs_file(path)


def test_manifest_survives_a_torn_last_line(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.append({"key": "a", "status": "done", "files": []})
    with open(m.path, "a") as f:
        f.write('{"key": "b", "status": "do')  # a crash while writing
    m.append({"key": "c", "status": "done", "files": []})
    assert [r["key"] for r in m.records()] == ["a", "c"]
    assert m.done_keys(tmp_path) == {"a", "c"}
    m.append({"key": "c", "status": "done", "files": ["missing.png"]})  # the latest line decides
    assert m.done_keys(tmp_path) == {"a"}


def test_batch_modules_import_neither_torch_nor_ray():
    code = ("import sys\nimport sdxl_nodes.runtime.batch, sdxl_nodes.runtime.batch_ray\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')"
            " or m == 'sdxl_nodes.nodes'"
            " or (m.startswith('sdxl_nodes.sdxl_core.') and m != 'sdxl_nodes.sdxl_core.errors'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# Running (tiny checkpoints)


@pytest.fixture
def dirs(tmp_path, models_dir, monkeypatch):
    return {"models": models_dir, "input": tmp_path / "input", "output": tmp_path / "output", "temp": tmp_path / "temp"}


def folder_args(d: dict, output: Path | None = None) -> list[str]:
    return ["--models-dir", str(d["models"]), "--input-dir", str(d["input"]),
            "--output-dir", str(output or d["output"]), "--temp-dir", str(d["temp"])]


def manifest_lines(output: Path) -> list[dict]:
    text = (output / "manifest.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line whole: no torn lines


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_invalid_job_is_reported_with_its_number_before_anything_runs(dirs, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"7.seed": 1}\n{"99.seed": 2}\n{"7.steps": 0}\n')
    rc = cli.main(["run", BASE_WF, *SMALL, "--jobs", str(jobs), "--quiet", *folder_args(dirs)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "job 2 (jobs.jsonl line 2): '99.seed=2': no node with id '99'" in err
    assert "job 3 (jobs.jsonl line 3):" in err and "steps" in err
    assert "2 of 3 jobs are invalid; nothing was run" in err
    assert not dirs["output"].exists()  # job 1 was valid but nothing ran


def test_sweep_reruns_only_what_changed_and_matches_plain_runs(dirs, monkeypatch, capsys):
    calls: Counter = Counter()
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        original = getattr(cls, cls.FUNCTION)

        def counted(self, *args, _original=original, _id=node_id, **kwargs):
            calls[_id] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, cls.FUNCTION, counted)
    reads = []
    real_load_part = ckpt_module.load_part
    monkeypatch.setattr(ckpt_module, "load_part", lambda *a, **k: reads.append(a[1]) or real_load_part(*a, **k))

    rc = cli.main(["run", BASE_WF, *SMALL, "--sweep", '2.text_g=["a red cube", "a blue ball"]',
                   "--sweep", "7.seed=1..2", *folder_args(dirs)])
    assert rc == 0, capsys.readouterr().err
    assert "4 of 4 jobs done" in capsys.readouterr().out
    # prompt-major order: the positive encoder and its size conditioning run once per prompt (2), the
    # negative ones once, the sampler and what follows once per job
    assert calls == {"SDXLCheckpointLoader": 1, "SDXLDualCLIPEncode": 3, "SDXLSizeCropConditioning": 3,
                     "SDXLEmptyLatent": 1, "SDXLBaseSampler": 4, "SDXLVAEDecode": 4, "SDXLSaveImage": 4}
    assert sorted(reads) == ["clip_g", "clip_l", "unet", "vae"]  # each network read from disk once

    lines = manifest_lines(dirs["output"])
    assert [(r["job"], r["status"], r["overrides"], r["seed"]) for r in lines] == [
        (1, "done", {"2.text_g": "a red cube", "7.seed": 1}, {"7": 1}),
        (2, "done", {"2.text_g": "a red cube", "7.seed": 2}, {"7": 2}),
        (3, "done", {"2.text_g": "a blue ball", "7.seed": 1}, {"7": 1}),
        (4, "done", {"2.text_g": "a blue ball", "7.seed": 2}, {"7": 2})]
    files = [r["files"] for r in lines]
    assert files == [[f"sdxl_base_0000{i}_.png"] for i in range(1, 5)]
    images = [pixels(dirs["output"] / f[0]) for f in files]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])

    # job 3 equals a plain run with the same values (overrides went to the right job, no stale cache)
    plain = dirs["output"].parent / "plain"
    assert cli.main(["run", BASE_WF, *SMALL, "--set", "2.text_g=a blue ball", "--set", "7.seed=1",
                     *folder_args(dirs, plain)]) == 0
    capsys.readouterr()
    assert np.array_equal(pixels(plain / "sdxl_base_00001_.png"), images[2])


def test_failing_job_is_recorded_and_the_rest_run(dirs, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    # denoise_end 0.01 of 2 steps passes validation (a valid float) but leaves the base no step: fails at run
    jobs.write_text('{"7.seed": 1}\n{"7.denoise_end": 0.01}\n{"7.seed": 3}\n')
    rc = cli.main(["run", BASE_WF, *SMALL, "--jobs", str(jobs), "--quiet", *folder_args(dirs)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 of 3 jobs failed (see manifest.jsonl)" in err
    lines = manifest_lines(dirs["output"])
    assert [r["status"] for r in lines] == ["done", "failed", "done"]
    assert "denoise_end" in lines[1]["error"] and lines[1]["files"] == []
    assert all((dirs["output"] / f).is_file() for r in lines for f in r["files"])


class Run:
    """`sdxl-nodes run` in a subprocess whose stderr (progress bars included) is read as it comes."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.err += chunk

    def signal_mid_job(self, manifest: Path, lines: int, sig: int, timeout: float = 240) -> None:
        """Once the manifest has `lines` lines, wait for the next job's sampler to report a step, then signal.

        The step bar says the job is inside its sampler with steps left, so the signal lands mid-job on a
        fast machine as on a loaded one."""
        end = time.monotonic() + timeout
        mark = None
        while time.monotonic() < end and self.proc.poll() is None:
            if mark is None and manifest.exists() and manifest.read_text().count("\n") >= lines:
                mark = len(self.err)
            if mark is not None and re.search(rb"Base Sampler \[7\]:.*? [1-9]/12 ", self.err[mark:]):
                self.proc.send_signal(sig)
                return
            time.sleep(0.005)
        self.proc.kill()
        raise AssertionError(f"no step of job {lines + 1} seen (rc {self.proc.poll()}): {self.err[-2000:]!r}")

    def wait(self) -> tuple[int, str]:
        rc = self.proc.wait(timeout=120)
        self.reader.join(10)
        return rc, self.err.decode(errors="replace")


def test_ctrl_c_then_crash_then_resume_runs_every_job_exactly_once(dirs, capsys):
    out = dirs["output"]
    manifest = out / "manifest.jsonl"
    settings = ["--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=12", "--sweep", "7.seed=1..5",
                *folder_args(dirs)]
    cmd = [sys.executable, "-m", "sdxl_nodes.runtime.cli", "run", BASE_WF, *settings]

    run = Run(cmd)
    run.signal_mid_job(manifest, 2, signal.SIGINT)  # Ctrl-C inside job 3
    rc, stderr = run.wait()
    assert rc == 130, stderr
    assert "run again with --resume" in stderr
    lines = manifest_lines(out)
    assert [r["status"] for r in lines] == ["done", "done", "interrupted"], lines
    assert lines[2]["job"] == 3 and lines[2]["files"] == []

    run = Run(cmd + ["--resume"])
    run.signal_mid_job(manifest, 4, signal.SIGKILL)  # a crash inside job 4: no chance to write anything
    rc, _stderr = run.wait()
    assert rc == -signal.SIGKILL
    assert [r["status"] for r in manifest_lines(out)] == ["done", "done", "interrupted", "done"]

    rc = cli.main(["run", BASE_WF, *settings, "--quiet", "--resume"])
    assert rc == 0
    assert "jobs already done" in capsys.readouterr().out
    lines = manifest_lines(out)
    done = [r for r in lines if r["status"] == "done"]
    assert sorted(r["job"] for r in done) == [1, 2, 3, 4, 5]  # every job done exactly once
    assert len(lines) == len(set(json.dumps(r, sort_keys=True) for r in lines))  # no duplicate lines
    assert all((out / f).is_file() for r in done for f in r["files"])
    assert len({f for r in done for f in r["files"]}) == 5


# ------------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # the [ray] extra, installed by scripts/setup.sh
    ray.init(num_cpus=2, namespace="sdxl-nodes", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_two_actors_one_killed_mid_run_give_the_local_images(ray_cluster, dirs, tmp_path, capsys):
    ray = ray_cluster
    sweep = ["--sweep", "7.seed=1..12", "--quiet"]
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    # Each 1-CPU actor runs torch on one thread (Ray sets OMP_NUM_THREADS=1); so does the local reference,
    # since float sums in another thread split may differ in the last bit and flip a pixel level.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["run", BASE_WF, *SMALL, *sweep, *folder_args(dirs, local_out)]) == 0
    finally:
        torch.set_num_threads(threads)

    killed = {}

    def kill_one_worker():
        end = time.monotonic() + 300
        while time.monotonic() < end and "at" not in killed:
            path = ray_out / "manifest.jsonl"
            if path.exists() and path.read_text().count("\n") >= 3:
                names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                               if a["name"].startswith("sdxl-nodes-worker-"))
                ray.kill(ray.get_actor(names[0], namespace="sdxl-nodes"), no_restart=False)
                killed["at"] = path.read_text().count("\n")
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    rc = cli.main(["run", BASE_WF, *SMALL, *sweep, "--ray", "auto", "--ray-workers", "2",
                   *folder_args(dirs, ray_out)])
    killer.join(5)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert 3 <= killed["at"] < 12  # the kill happened while jobs were left

    local = {r["key"]: r for r in manifest_lines(local_out)}
    remote = manifest_lines(ray_out)
    assert sorted(r["job"] for r in remote) == list(range(1, 13)) and {r["status"] for r in remote} == {"done"}
    assert len({r["worker"] for r in remote}) >= 2  # both actors worked (3 processes with the restart)
    for r in remote:
        assert np.array_equal(pixels(ray_out / r["files"][0]), pixels(local_out / local[r["key"]]["files"][0]))


def test_ray_with_batch_runs_groups_on_the_workers(ray_cluster, dirs, tmp_path, capsys):
    # catches: a group's results placed under another job, groups split or dropped on the way to the workers
    sweep = ["--sweep", '2.text_g=["a red cube", "a blue ball"]', "--sweep", "7.seed=1..2", "--quiet"]
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU actor (see above)
    try:
        assert cli.main(["run", BASE_WF, *SMALL, *sweep, *folder_args(dirs, local_out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rc = cli.main(["run", BASE_WF, *SMALL, *sweep, "--batch", "2", "--ray", "auto", "--ray-workers", "2",
                   *folder_args(dirs, ray_out)])
    assert rc == 0, capsys.readouterr().err
    local = {r["key"]: r for r in manifest_lines(local_out)}
    remote = manifest_lines(ray_out)
    assert sorted(r["job"] for r in remote) == [1, 2, 3, 4] and {r["batch"] for r in remote} == {2}
    assert all(r["status"] == "done" for r in remote)
    for r in remote:
        assert local[r["key"]]["overrides"] == r["overrides"]
        assert np.array_equal(pixels(ray_out / r["files"][0]), pixels(local_out / local[r["key"]]["files"][0]))


def test_ray_workers_fit_the_smallest_machine_and_take_one_gpu_each():
    from sdxl_nodes.runtime.batch_ray import actor_options

    class Cluster:  # the two calls actor_options makes, answered as Ray would for these machines
        def __init__(self, cpus, gpus=0):
            self.cpus, self.gpus = cpus, gpus

        def cluster_resources(self):
            return {"CPU": float(sum(self.cpus)), "GPU": float(self.gpus)}

        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": float(c)}} for c in self.cpus]

    assert actor_options(Cluster([2]), 2) == (2, {"num_cpus": 1})  # the test cluster above
    assert actor_options(Cluster([16, 8]), None) == (2, {"num_cpus": 8})  # 12 each would not fit the 8-CPU one
    assert actor_options(Cluster([16, 8], gpus=4), None) == (4, {"num_gpus": 1})


# ------------------------------------------------------------------------------------------------
# --batch N: several jobs in one UNet batch, the pixels of one job at a time


@pytest.fixture
def unet_rows(monkeypatch):
    """The batch size of every UNet call."""
    rows: list[int] = []
    forward = UNetModel.forward
    monkeypatch.setattr(UNetModel, "forward", lambda self, x, *a, **k: rows.append(x.shape[0]) or forward(self, x, *a, **k))
    return rows


def run_both(dirs, tmp_path, capsys, unet_rows, workflow, args, batch):
    """The same jobs with --batch 1 and --batch N: (manifest lines, UNet call sizes) of each."""
    out = {}
    for n in (1, batch):
        unet_rows.clear()
        rc = cli.main(["run", workflow, *args, "--batch", str(n), "--quiet", *folder_args(dirs, tmp_path / f"b{n}")])
        assert rc == 0, capsys.readouterr().err
        out[n] = (manifest_lines(tmp_path / f"b{n}"), list(unet_rows))
    capsys.readouterr()
    return out


def assert_same_files(tmp_path, one, many, batch):
    """Same jobs, names, seeds and PNG bytes (pixels and the job's own prompt in the PNG) in both runs."""
    assert len(one) == len(many)
    for a, b in zip(one, many):
        assert (a["job"], a["key"], a["overrides"], a["seed"], a["status"]) == \
            (b["job"], b["key"], b["overrides"], b["seed"], b["status"]) and a["status"] == "done"
        assert a["files"] == b["files"] and a["files"]
        assert "batch" not in a and b["batch"] == batch
        for f in a["files"]:
            assert (tmp_path / "b1" / f).read_bytes() == (tmp_path / f"b{batch}" / f).read_bytes(), (a["job"], f)
    assert len({f for r in one for f in r["files"]}) == sum(len(r["files"]) for r in one)  # no file twice


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_batch_of_4_writes_the_unbatched_files(sampler, dirs, tmp_path, capsys, unet_rows):
    # catches: one noise generator for the whole batch (ancestral/SDE jobs 2-4 change); jobs' prompts or
    # seeds swapped inside the batch; the per-image vector layers run over the whole batch (last bits differ)
    args = [*SMALL, "--set", f"7.sampler_name={sampler}", "--sweep", '2.text_g=["a red cube", "a blue ball"]',
            "--sweep", "7.seed=1..4"]
    runs = run_both(dirs, tmp_path, capsys, unet_rows, BASE_WF, args, 4)
    (one, rows_one), (many, rows_many) = runs[1], runs[4]
    assert_same_files(tmp_path, one, many, 4)
    assert [r["overrides"] for r in many[:2]] == [{"2.text_g": "a red cube", "7.seed": 1},
                                                  {"2.text_g": "a red cube", "7.seed": 2}]
    # one UNet call for 4 jobs (uncond + cond each) where there were 4 calls of 2
    assert set(rows_one) == {2} and set(rows_many) == {8} and len(rows_one) == 4 * len(rows_many)
    images = [pixels(tmp_path / "b4" / r["files"][0]) for r in many]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[4])


def test_batch_in_core_nodes_through_base_and_refiner(dirs, tmp_path, capsys, unet_rows):
    # ComfyUI's node set: two CLIPTextEncode prompts swept, latents of 2 images a job, KSamplerAdvanced base
    # (ancestral, stops with leftover noise) into the refiner's KSamplerAdvanced: both samplers batched.
    # catches: a job's cond not repeated to its 2 latents the way a lone run repeats it; the refiner getting
    # another job's half-done latent; batch_index/latent rows of a job split across jobs
    base, refiner = "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"
    sampler = {"steps": 3, "cfg": 6.5, "sampler_name": "euler_ancestral", "scheduler": "normal"}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": refiner}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": 5, **sampler, "positive": ["3", 0],
            "negative": ["4", 0], "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 2,
            "return_with_leftover_noise": "enable"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lighthouse"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "9": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["2", 0], "add_noise": "disable", "noise_seed": 0, **sampler, "positive": ["7", 0],
            "negative": ["8", 0], "latent_image": ["6", 0], "start_at_step": 2, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "10": {"class_type": "VAEDecode", "inputs": {"vae": ["2", 2], "samples": ["9", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "core"}},
    }
    path = tmp_path / "core.json"
    path.write_text(json.dumps(prompt))
    args = ["--zip", "--sweep", '3.text=["a lighthouse", "a red barn", "a lighthouse"]',
            "--sweep", '7.text=["a lighthouse", "a red barn", "a lighthouse"]', "--sweep", "6.noise_seed=[5, 6, 7]"]
    runs = run_both(dirs, tmp_path, capsys, unet_rows, str(path), args, 3)
    (one, rows_one), (many, rows_many) = runs[1], runs[3]
    assert_same_files(tmp_path, one, many, 3)
    assert [len(r["files"]) for r in many] == [2, 2, 2]
    # 3 model evaluations (base 2 steps, refiner 1) per job of 4 rows (2 images, uncond + cond); batched, the
    # 12 rows of an evaluation go in calls of at most UNET_MAX_BATCH = 8 that hold whole jobs: 8 + 4
    assert sorted(rows_one) == [4] * 9 and rows_many == [8, 4] * 3


def test_jobs_that_cannot_share_a_batch_run_one_by_one(dirs, tmp_path, capsys, unet_rows, caplog):
    # a prompt longer than 77 tokens gives a 154-token context: it cannot be stacked with a 77-token one
    long = " ".join(["a very long prompt about a lighthouse"] * 20)
    args = [*SMALL, "--sweep", f'2.text_g={json.dumps(["a short prompt", long])}']
    with caplog.at_level("WARNING"):
        runs = run_both(dirs, tmp_path, capsys, unet_rows, BASE_WF, args, 2)
    assert_same_files(tmp_path, runs[1][0], runs[2][0], 2)
    assert "sampled one by one" in caplog.text and "different token lengths" in caplog.text
    assert runs[2][1] == [2, 2, 2, 2]  # 2 steps of one job, then of the other: each alone


def test_a_job_failing_inside_a_batch_is_recorded_for_that_job(dirs, tmp_path, capsys, monkeypatch):
    from sdxl_nodes.nodes import text as text_nodes
    from sdxl_nodes.nodes.environment import NodeInputError

    encode = text_nodes.encode_text

    def fails_on_boom(clip, text_g, text_l, progress=None):
        if text_g == "boom":
            raise NodeInputError("this prompt is refused")
        return encode(clip, text_g, text_l, progress)

    monkeypatch.setattr(text_nodes, "encode_text", fails_on_boom)
    rc = cli.main(["run", BASE_WF, *SMALL, "--sweep", '2.text_g=["a cat", "boom", "a dog"]', "--batch", "3",
                   "--quiet", *folder_args(dirs)])
    err = capsys.readouterr().err
    assert rc == 1 and "1 of 3 jobs failed" in err
    lines = manifest_lines(dirs["output"])
    assert [(r["job"], r["status"]) for r in lines] == [(1, "done"), (2, "failed"), (3, "done")]
    assert "this prompt is refused" in lines[1]["error"]
    assert [r["files"] for r in lines] == [["sdxl_base_00001_.png"], [], ["sdxl_base_00002_.png"]]


def test_ctrl_c_inside_a_batch_marks_its_jobs_interrupted_and_resume_runs_them(dirs, monkeypatch, capsys):
    from sdxl_nodes.nodes.progress import StepReporter

    steps = Counter()
    report = StepReporter.__call__

    def ctrl_c_in_second_batch(self, step, total, x, x0):
        steps["n"] += 1
        if steps["n"] == 3:  # step 1 of the second batch (2 steps a batch): Ctrl-C, as a terminal sends it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the main thread turns it into an interrupt request before the next step
        return report(self, step, total, x, x0)

    monkeypatch.setattr(StepReporter, "__call__", ctrl_c_in_second_batch)
    run = ["run", BASE_WF, *SMALL, "--sweep", "7.seed=1..6", "--batch", "2", "--quiet", *folder_args(dirs)]
    assert cli.main(run) == 130
    assert "run again with --resume" in capsys.readouterr().err
    assert [(r["job"], r["status"]) for r in manifest_lines(dirs["output"])] == [
        (1, "done"), (2, "done"), (3, "interrupted"), (4, "interrupted")]
    monkeypatch.setattr(StepReporter, "__call__", report)
    assert cli.main([*run, "--resume"]) == 0
    lines = manifest_lines(dirs["output"])
    assert sorted(r["job"] for r in lines if r["status"] == "done") == [1, 2, 3, 4, 5, 6]
    assert [r["files"] for r in lines if r["status"] == "done"] == [[f"sdxl_base_0000{i}_.png"] for i in range(1, 7)]


def test_grouping_keeps_job_order_and_only_seeds_and_texts_vary():
    from sdxl_nodes.runtime.batch import Job, group_jobs

    info = {"Enc": {"input": {"required": {"text": ["STRING", {}]}}},
            "Sampler": {"input": {"required": {"seed": ["INT", {}], "cfg": ["FLOAT", {}]}}}}

    def job(n, text="a", seed=1, cfg=7.0, save2=None):
        prompt = {"1": {"class_type": "Enc", "inputs": {"text": text}},
                  "2": {"class_type": "Sampler", "inputs": {"seed": seed, "cfg": cfg, "text": ["1", 0]}},
                  "3": {"class_type": "Save", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}
        if save2:
            prompt["4"] = {"class_type": "Save", "inputs": {"images": ["2", 0], "filename_prefix": save2}}
        return Job(n, [], [], prompt=prompt)

    def numbers(groups):
        return [[j.number for j in g] for g in groups]

    jobs = [job(1), job(2, text="b", seed=2), job(3, cfg=5.0), job(4, seed=9), job(5, text="c"), job(6, seed=3)]
    # cfg differs for job 3: it runs alone and ends the group before it; groups never reorder jobs
    assert numbers(group_jobs(jobs, 2, info)) == [[1, 2], [3], [4, 5], [6]]
    assert numbers(group_jobs(jobs, 8, info)) == [[1, 2], [3], [4, 5, 6]]
    assert numbers(group_jobs(jobs, 1, info)) == [[1], [2], [3], [4], [5], [6]]
    # two save nodes with one prefix would number their files in another order when batched
    assert numbers(group_jobs([job(1, save2="x"), job(2, save2="x")], 4, info)) == [[1], [2]]
    assert numbers(group_jobs([job(1, save2="y"), job(2, seed=5, save2="y")], 4, info)) == [[1, 2]]


def test_batch_needs_jobs_and_a_positive_size(dirs, capsys):
    assert cli.main(["run", BASE_WF, *SMALL, "--batch", "4", *folder_args(dirs)]) == 2
    assert "--batch N groups the jobs of --sweep or --jobs" in capsys.readouterr().err
    assert cli.main(["run", BASE_WF, *SMALL, "--sweep", "7.seed=1..2", "--batch", "0", *folder_args(dirs)]) == 2
    assert "--batch 0" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [2, 5])
def test_sample_batch_equals_each_job_alone(rows, tiny_base):
    # sdxl_core level, with what differs per job: conditioning, seed, batch_index, an inpainting mask and
    # whether the latent is empty. 3 jobs of 2 images: CFG calls of 12 rows, sliced at UNET_MAX_BATCH 8 into
    # whole jobs (8 + 4); of 5 images: each job's 10 rows sliced 8 + 2 as its lone run slices them.
    # catches: one noise source for the batch, masks/latents tiled across jobs, slices splitting a job's rows
    sampler = "euler_ancestral"
    g = torch.Generator().manual_seed(3)
    c = tiny_base.config.unet

    def cond():
        return Conditioning(torch.randn(1, 77, c.context_dim, generator=g), torch.randn(1, c.adm_in_channels, generator=g))

    negative = cond()
    latents = [torch.randn(rows, 4, 8, 8, generator=g), torch.zeros(rows, 4, 8, 8),
               torch.randn(rows, 4, 8, 8, generator=g)]
    mask = (torch.rand(2, 64, 64, generator=g) > 0.5).float()
    jobs = [SampleJob(cond(), negative, latents[k], seed=100 + k, batch_index=[k + 2 * i for i in range(rows)],
                      noise_mask=mask * (k + 1) / 3) for k in range(3)]
    settings = dict(steps=2, cfg=5.0, sampler_name=sampler, scheduler="karras", denoise=0.8)
    alone = [sample(tiny_base.unet, j.positive, j.negative, j.latent, seed=j.seed, batch_index=j.batch_index,
                    noise_mask=j.noise_mask, **settings) for j in jobs]
    together = sample_batch(tiny_base.unet, jobs, **settings)
    for k, (a, b) in enumerate(zip(alone, together)):
        assert torch.equal(a, b), (sampler, k, (a - b).abs().max().item())
    assert not torch.equal(together[0], together[2])
