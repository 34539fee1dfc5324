import json
import sys
import time

from hf_modelopt.parallel import Task, run_tasks, task_environments

CHILD = ("import json, os, sys, time; started = time.time(); time.sleep(1.0); "
         "print(json.dumps({'start': started, 'end': time.time(), 'threads': os.environ.get('OMP_NUM_THREADS'), "
         "'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')})); sys.exit(int(sys.argv[1]))")


def test_tasks_share_the_cores_and_run_side_by_side(tmp_path):
    tasks = [Task(f"t{i}", [sys.executable, "-c", CHILD, str(int(i == 2))], tmp_path / f"t{i}.log") for i in range(3)]
    started = time.monotonic()
    codes = run_tasks(tasks, jobs=2, gpus=[], poll_seconds=0.1)
    assert codes == {"t0": 0, "t1": 0, "t2": 1}  # a failed task is reported, the others still run
    runs = [json.loads(task.log_file.read_text()) for task in tasks]
    assert runs[0]["start"] < runs[1]["end"] and runs[1]["start"] < runs[0]["end"]  # t0 and t1 overlapped
    assert runs[2]["start"] >= min(runs[0]["end"], runs[1]["end"])  # t2 waited for a free slot
    assert time.monotonic() - started < 3 * 1.0 + 1.5  # faster than one after the other
    assert {run["threads"] for run in runs} == {task_environments(2, gpus=[])[0]["OMP_NUM_THREADS"]}


def test_each_task_gets_its_own_gpu_round_robin():
    assert [env["CUDA_VISIBLE_DEVICES"] for env in task_environments(3, gpus=["0", "1"])] == ["0", "1", "0"]
    assert task_environments(2, gpus=[], cpus=16)[1]["OMP_NUM_THREADS"] == "8"
    assert task_environments(4, gpus=[], cpus=2)[0]["OMP_NUM_THREADS"] == "1"
