"""How the Slurm driver decides that a job has ended, without a cluster: a scheduler that stops listing a job,
and one that cannot be asked at all (squeue failing: no accounting either)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from editdecay.grid.backends.slurm_jobs import SlurmBackend


class Scheduler:
    def __init__(self, queues):
        self.queues, self.asked = list(queues), 0

    def queued(self):
        self.asked += 1
        return self.queues.pop(0) if len(self.queues) > 1 else self.queues[0]

    def why_ended(self, job_id):
        return f"JobState=FAILED ExitCode=137:0 (job {job_id})"


def job(tmp_path: Path, job_id: str):
    return SimpleNamespace(job_id=job_id, paths=SimpleNamespace(result_pickle=tmp_path / f"{job_id}_result.pkl",
                                                                stderr=tmp_path / f"{job_id}.err"))


def test_a_job_gone_from_squeue_without_a_result_is_lost_after_the_grace(tmp_path):
    backend = SlurmBackend(cluster="slurm", poll=0.01, grace=0.2)
    sched = Scheduler([{"7_0": "RUNNING", "7_1": "RUNNING"}, {"7_1": "RUNNING"}])      # 7_0 leaves the queue
    waiting = {"stage-a": job(tmp_path, "7_0"), "stage-b": job(tmp_path, "7_1")}
    ended = backend._wait(waiting, sched, None, None, None)
    assert list(ended) == ["stage-a"] and "Slurm job 7_0 ended without a result" in ended["stage-a"]
    assert "ExitCode=137:0" in ended["stage-a"] and list(waiting) == ["stage-b"]
    assert sched.asked >= 3                                # it waited the grace, asking again, before saying so


def test_when_squeue_cannot_answer_the_jobs_are_named_and_given_up_after_the_poll_timeout(tmp_path):
    backend = SlurmBackend(cluster="slurm", poll=0.01, poll_timeout=0.2)
    waiting = {"stage-a": job(tmp_path, "9_0")}
    ended = backend._wait(waiting, Scheduler([None]), None, None, None)
    assert "Slurm job 9_0: squeue failed for 0 s" in ended["stage-a"] and "scancel 9_0" in ended["stage-a"]
