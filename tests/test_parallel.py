import json
import sys
import time

from hf_modelopt.parallel import ProcessRun, run_processes, slot_environments

CHILD = ("import json, os, sys, time; started = time.time(); time.sleep(1.0); "
         "print(json.dumps({'start': started, 'end': time.time(), 'threads': os.environ.get('OMP_NUM_THREADS'), "
         "'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')})); sys.exit(int(sys.argv[1]))")


def test_runs_share_the_cores_and_run_side_by_side(tmp_path):
    runs = [ProcessRun(f"t{i}", [sys.executable, "-c", CHILD, str(int(i == 2))], tmp_path / f"t{i}.log")
            for i in range(3)]
    started = time.monotonic()
    codes = run_processes(runs, jobs=2, gpus=[], poll_seconds=0.1)
    assert codes == {"t0": 0, "t1": 0, "t2": 1}  # a failed run is reported, the others still run
    outputs = [json.loads(run.log_file.read_text()) for run in runs]
    assert outputs[0]["start"] < outputs[1]["end"] and outputs[1]["start"] < outputs[0]["end"]  # t0, t1 overlapped
    assert outputs[2]["start"] >= min(outputs[0]["end"], outputs[1]["end"])  # t2 waited for a free slot
    assert time.monotonic() - started < 3 * 1.0 + 1.5  # faster than one after the other
    assert {run["threads"] for run in outputs} == {slot_environments(2, gpus=[])[0]["OMP_NUM_THREADS"]}


def test_each_run_gets_its_own_gpu_round_robin():
    assert [env["CUDA_VISIBLE_DEVICES"] for env in slot_environments(3, gpus=["0", "1"])] == ["0", "1", "0"]
    assert slot_environments(2, gpus=[], cpus=16)[1]["OMP_NUM_THREADS"] == "8"
    assert slot_environments(4, gpus=[], cpus=2)[0]["OMP_NUM_THREADS"] == "1"
