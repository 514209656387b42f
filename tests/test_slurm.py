"""The project's own batch scripts on a real SLURM cluster (slurm-wlm: one controller, two emulated
nodes on this machine, CPU): a 2-node x 2-task TP=2 x DP=2 distillation through srun, a dependent prune -> distill ->
export chain, a distillation that gets the warning signal, checkpoints, requeues itself and finishes with
the same loss as an uninterrupted run, and one that, requeued after a preemption, then fails and is not requeued
again. The cluster is stopped at the end, even on failure."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import REPO, commands
import slurm_cluster

pytestmark = pytest.mark.skipif(
    not slurm_cluster.available(),
    reason="SKIPPED LOUDLY: slurm-wlm is not installed, so no SLURM test ran (make test installs it with apt-get "
           "when run as root; otherwise: sudo apt-get install slurm-wlm)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield c
    finally:
        c.stop()


def _submit(cluster, tmp_path, stage, sbatch, overrides, env=None):
    env = dict(cluster.env, GPUS_PER_NODE="0", NEMO_MINITRON_LOG_ROOT=str(tmp_path / "logs"), **(env or {}))
    out = subprocess.run([REPO / "slurm" / "submit.sh", stage, f"--output={tmp_path}/%x-%j.out", "--mem=5000",
                          *sbatch, "--", *map(str, overrides)], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _kd_args(tiny_ckpt, tiny_student, tiny_data, out, steps, ckpt_every=1000):
    return [f"teacher={tiny_ckpt}", f"student={tiny_student}", f"output={out}", f"data.train={tiny_data}",
            "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1", f"checkpoint.every_n_steps={ckpt_every}",
            "optim.lr=3e-3", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def references(tiny_ckpt, tiny_student, tiny_data, tmp_path_factory):
    """The uninterrupted one-process runs the jobs are compared with (4 and 16 steps), in one process."""
    root = tmp_path_factory.mktemp("slurm_refs")
    commands([{"name": f"ref{n}", "args": ["distill", *_kd_args(tiny_ckpt, tiny_student, tiny_data, root / f"ref{n}", n)]}
              for n in (4, 16)])
    return {n: root / f"ref{n}" for n in (4, 16)}


def _last_loss(run_dir):
    from nemo_minitron.distill.train import read_metrics

    m = read_metrics(run_dir / "metrics.jsonl")["train"]
    return m[max(m)]["loss"], max(m)


def _log(tmp_path, job):
    logs = list((tmp_path / "logs").glob(f"*-{job}"))
    return "".join(p.read_text() for d in logs for p in sorted(d.glob("*"))) if logs else ""


def test_two_nodes_two_tasks_tp2_dp2_distillation_through_srun(cluster, tiny_ckpt, tiny_student, tiny_data, references,
                                                                tmp_path):
    """2 nodes x 2 tasks: TP=2 inside each node, DP=2 across the nodes (gradients reduce-scattered and
    parameters all-gathered between the nodes by the distributed optimizer); tensor parallelism without
    sequence parallelism here (test_cluster.py runs it with). The loss curve of one process."""
    from nemo_minitron.distill.train import read_metrics

    ref = references[4]
    out = tmp_path / "tp2dp2"
    job = _submit(cluster, tmp_path, "distill", ["--nodes=2", "--ntasks-per-node=2"],
                  [*_kd_args(tiny_ckpt, tiny_student, tiny_data, out, 4), "trainer.num_nodes=2",
                   "model.tensor_model_parallel_size=2", "model.sequence_parallel=false"])
    j = cluster.wait(job)
    assert j["JobState"] == "COMPLETED", _log(tmp_path, job)[-3000:]
    assert j["NumNodes"] == "2" and j["NodeList"] == "node[1-2]"
    log = _log(tmp_path, job)
    assert "2 node(s), 4 task(s)" in log and "(TP=2 PP=1 DP=2, fp32, distributed optimizer over DP=2)" in log
    assert "sequence_parallel=False" in log
    assert (tmp_path / "logs" / f"minitron-distill-{job}" / "config.yaml").is_file()
    got, want = read_metrics(out / "metrics.jsonl")["train"], read_metrics(ref / "metrics.jsonl")["train"]
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-5), step


def test_dependent_chain_prune_distill_export(cluster, tiny_ckpt, tiny_data, tmp_path):
    run_dir = tmp_path / "chain"
    env = dict(cluster.env, GPUS_PER_NODE="0", NEMO_MINITRON_LOG_ROOT=str(tmp_path / "logs"))
    common = f"--output={tmp_path}/%x-%j.out --mem=5000 --ntasks-per-node=1"
    out = subprocess.run([REPO / "slurm" / "submit_pipeline.sh", run_dir, tiny_ckpt,
                          "--prune", f"data.calibration={tiny_data} data.calibration_samples=8 data.seq_length=32 "
                                     "prune.hidden_size=48 prune.ffn_hidden_size=96",
                          "--prune-sbatch", common, "--distill-sbatch", common, "--export-sbatch", common,
                          "--distill", " ".join(_kd_args("x", "x", tiny_data, "x", 3)[3:]),
                          "--export", "format=hf export.dtype=fp32"],
                         env=env, capture_output=True, text=True, check=True).stdout
    ids = {line.split(":")[0]: line.split()[1] for line in out.strip().splitlines()}
    assert set(ids) == {"prune", "distill", "export"}
    assert cluster.job(ids["distill"])["Dependency"].startswith(f"afterok:{ids['prune']}")
    jobs = {k: cluster.wait(v) for k, v in ids.items()}
    assert all(j["JobState"] == "COMPLETED" for j in jobs.values()), {k: j["JobState"] for k, j in jobs.items()}
    assert jobs["distill"]["StartTime"] >= jobs["prune"]["EndTime"]
    assert jobs["export"]["StartTime"] >= jobs["distill"]["EndTime"]
    assert (run_dir / "export" / "config.json").is_file()


def _preempt_once(cluster, tmp_path, args, env=None):
    """Submits a 1-task distillation that checkpoints every 4 steps and sends it the warning signal while its
    step-8 checkpoint is held (test hook), so it always arrives mid-run: the run checkpoints at step 9, exits
    with status 3 and requeues itself. Returns the job id."""
    job = _submit(cluster, tmp_path, "distill", ["--nodes=1", "--ntasks-per-node=1", "--time=10"], args,
                  env={"NEMO_MINITRON_PAUSE_AT": "checkpoint_save@8", "NEMO_MINITRON_PAUSE_SECONDS": "4", **(env or {})})
    deadline = time.time() + 300
    while "paused at checkpoint_save@8" not in _log(tmp_path, job):
        assert time.time() < deadline, _log(tmp_path, job)[-2000:]
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path, job)
        time.sleep(0.5)
    # what SLURM does at --signal=B:USR1@T before the time limit: USR1 to the batch shell
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    return job


def test_warning_signal_checkpoints_requeues_and_matches_uninterrupted(cluster, tiny_ckpt, tiny_student, tiny_data,
                                                                        references, tmp_path):
    """The job checkpoints every 4 steps, so megatron's checkpoint writer already runs its helper process
    (a multiprocessing manager) when the warning comes; SLURM signals every process of the step, and the
    preemption checkpoint must still be written."""
    steps = 16
    ref = references[steps]
    out = tmp_path / "preempted"
    job = _preempt_once(cluster, tmp_path, _kd_args(tiny_ckpt, tiny_student, tiny_data, out, steps, ckpt_every=4))
    j = cluster.wait(job, timeout=600)
    log = _log(tmp_path, job)
    assert j["JobState"] == "COMPLETED", log[-3000:]
    assert j["Restarts"] == "1", j
    assert "preempted: checkpoint at step 9 " in log and "requeueing job" in log
    # from the preemption checkpoint, not the step-8 one whose save was held (and so finished later)
    assert f"resuming from {out / 'checkpoints' / 'step=9-preempted-last'}" in log, log[-3000:]
    assert _last_loss(out) == _last_loss(ref)  # same final loss (exact on CPU) at the same final step
    assert (out / "student" / "context").is_dir()


def test_preempted_job_that_later_fails_is_not_requeued_again(cluster, tiny_ckpt, tiny_student, tiny_data, tmp_path):
    """Preempted once (checkpoint at step 9, requeued, resumed), then a non-finite stop (exit status 4) in the requeued
    attempt: the job ends FAILED with exit code 4 and one line saying why, not requeued again. (The requeue
    decision used to grep every log of the job's directory, which a requeued job keeps, for "exit status 3".)"""
    out = tmp_path / "preempted-then-nonfinite"
    job = _preempt_once(cluster, tmp_path,
                        [*_kd_args(tiny_ckpt, tiny_student, tiny_data, out, 14, ckpt_every=4), "trainer.max_nonfinite_steps=2"],
                        env={"NEMO_MINITRON_NONFINITE": "kd_loss@11,12"})
    deadline = time.time() + 600
    while (j := cluster.job(job)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        if int(j.get("Restarts", 0)) > 1 or time.time() > deadline:  # requeued again: stop it, it would loop
            cluster.run("scancel", job, check=False)
            break
        time.sleep(1)
    log = _log(tmp_path, job)
    assert (j["JobState"], j["ExitCode"], j["Restarts"]) == ("FAILED", "4:0", "1"), (j, log[-3000:])
    assert "preempted: checkpoint at step 9 " in log and "resuming from" in log
    assert log.count("requeueing job") == 1, log[-3000:]
    assert "was not finite for 2 consecutive steps (trainer.max_nonfinite_steps=2)" in log, log[-3000:]
    why = [line for line in log.splitlines() if "not requeued" in line]
    assert len(why) == 1 and why[0].startswith("exit status 4: not requeued (trainer.max_nonfinite_steps"), why
    assert not (out / "student").exists()


def test_search_as_job_array(cluster, tiny_ckpt, tiny_data, tmp_path):
    """slurm/submit_search.sh: rank -> one array task per finalist (distill + evaluate through srun steps of
    the driver) -> report, chained with afterok."""
    import json

    out = tmp_path / "search"
    env = dict(cluster.env, GPUS_PER_NODE="0", NEMO_MINITRON_LOG_ROOT=str(tmp_path / "logs"))
    args = [f"model={tiny_ckpt}", f"output={out}", f"data.calibration={tiny_data}", f"data.train={tiny_data}",
            f"data.validation={tiny_data}", "data.seq_length=32", "data.calibration_samples=8", "search.params=0.6",
            "search.tolerance=0.1", "search.multiple=16", "search.max_candidates=4", "search.top_k=2",
            "search.distill_steps=2", "search.eval_samples=8", "search.eval_seq_length=32", "search.depth_samples=8",
            "distill.seq_length=32", "distill.micro_batch_size=2", "distill.global_batch_size=4"]
    res = subprocess.run([REPO / "slurm" / "submit_search.sh", f"--output={tmp_path}/%x-%A_%a.out", "--mem=2500",
                          "--nodes=1", "--ntasks-per-node=1", "--", *args],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ids = {line.split(":")[0]: line.split()[1] for line in res.stdout.strip().splitlines()}
    assert set(ids) == {"rank", "distill", "report"}
    def logs():
        return "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))

    assert cluster.wait(ids["rank"], timeout=600)["JobState"] == "COMPLETED", logs()[-4000:]
    tasks = [cluster.wait(f"{ids['distill']}_{i}", timeout=600) for i in (0, 1)]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs()[-4000:]
    report = cluster.wait(ids["report"], timeout=300)
    assert report["JobState"] == "COMPLETED", logs()[-4000:]
    assert report["StartTime"] >= max(t["EndTime"] for t in tasks)
    table = json.loads((out / "search.json").read_text())
    assert len(table["finalists"]) == 2 and table["winner"] in {r["name"] for r in table["finalists"]}
    assert "srun --kill-on-bad-exit=1" in logs()  # the distillations ran as srun steps of the array tasks
    assert (out / "search.md").is_file()
