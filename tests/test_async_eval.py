"""Evaluation results of Ray's checkpoint validation task (`train.async_eval`) reaching metrics.jsonl, without Ray:
the task's result files, rank 0's run log and the driver's append after the run."""

import json

from facediff.storage import RunStorage
from facediff.runs import validation
from facediff.train import async_eval
from facediff.train.run_log import RunLog, read_metrics

ROW = {"kimg": 0.1, "loss": 0.5, "lr": 1e-3, "images_per_s": 10.0}


def _result(storage, step: int, fd: float) -> None:
    validation._write_whole(storage, async_eval.result_name(step),
                            {"step": step, "kimg": step * 0.008, "async_eval": True, "fd_mtcnn_onet": fd})


def test_results_join_the_log_once_each_tagged_with_their_checkpoint(tmp_path):
    storage = RunStorage(str(tmp_path), "run")
    run_log = RunLog(storage, total_steps=8, total_kimg=0.064, resumed_step=0, evals=True)
    run_log.write({"step": 1, **ROW})
    _result(storage, 2, 0.7)
    run_log.write({"step": 2, **ROW})  # not copied yet (PUSH_EVERY_S): results are taken at copies
    run_log.write({"step": 3, **ROW}, sync=True)
    run_log.write({"step": 4, **ROW}, sync=True)  # step 2's result is not appended twice
    evals = [r for r in read_metrics(storage.local) if r.get("async_eval")]
    assert [(r["step"], r["kimg"], r["fd_mtcnn_onet"]) for r in evals] == [(2, 0.016, 0.7)]
    assert [r["step"] for r in read_metrics(storage.local)] == [1, 2, 3, 2, 4]  # arrived after step 3's row
    run_log.close()

    # a resumed run's log knows what is merged; the driver appends what arrived after the workers ended
    _result(storage, 4, 0.5)
    resumed = RunLog(storage, total_steps=8, total_kimg=0.064, resumed_step=4, evals=True)
    assert resumed.evals_merged == {2}
    resumed.close()
    assert [r["step"] for r in validation.append_late_results(storage)] == [4]
    assert validation.append_late_results(storage) == []
    evals = [r for r in read_metrics(storage.local) if r.get("async_eval")]
    assert [(r["step"], r["fd_mtcnn_onet"]) for r in evals] == [(2, 0.7), (4, 0.5)]
    assert not list((storage.local / async_eval.EVALS_DIR).glob(".*.tmp"))  # atomic_write_text's temporary files


def test_validation_config_only_with_async_evaluation():
    from facediff.config import load_config

    cfg = load_config("configs/experiments/tiny/tiny_unet.yaml", ["eval.every_kimg=0.5"])
    storage = RunStorage("/tmp", "x")
    assert validation.validation_config(cfg, storage) is None
    cfg = load_config("configs/experiments/tiny/tiny_unet.yaml", [
        "eval.every_kimg=0.5", "eval.async_validation=true", "eval.async_resources={CPU: 2, GPU: 0.25, big: 1}"])
    config = validation.validation_config(cfg, storage)
    assert config.ray_remote_kwargs == {"num_cpus": 2.0, "num_gpus": 0.25, "resources": {"big": 1.0},
                                        "scheduling_strategy": "DEFAULT"}  # outside a Tune trial's placement group
    assert config.fn.keywords["experiment"]["eval"]["async_validation"] is True
    json.dumps(async_eval.due(4, 0.032).fn_kwargs)  # Ray stores a pending validation's kwargs as JSON
