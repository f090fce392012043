"""`facediff sample` and `facediff evaluate` on an exported tiny model (no training needed to test the plumbing), the
device they pick, and the evaluation loop dealing test records to ranks by id."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.rng import batch_generator
from facediff.runs.load import load_model
from facediff.sampling import generate


def test_exported_model_round_trips(tiny_export):
    cfg, task = load_model(tiny_export)
    expected = torch.load(tiny_export.parent / "expected.pt", weights_only=True)
    assert cfg.model.family == "unet" and (tiny_export / "model_index.json").is_file()
    loaded = task.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_sample_cli_writes_grid_and_images(tiny_export, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["sample", str(tiny_export), "--n", "5", "--out", str(out), "--steps", "2",
                                      "--sampler", "dpm++", "--batch-size", "2", "--individual", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 5 images of 32 px in a 3x2 grid with 2 px gutters
    assert len(list((tmp_path / "x").glob("*.png"))) == 5


def test_batches_get_distinct_seeds(tiny_export):
    _, task = load_model(tiny_export)
    images = generate(task, 4, "ddim", 2, seed=3, batch_size=2)
    assert not np.array_equal(images[:2], images[2:])  # the second batch is not a copy of the first
    assert np.array_equal(images, generate(task, 4, "ddim", 2, seed=3, batch_size=2))
    assert batch_generator(3, 0).initial_seed() != batch_generator(3, 1).initial_seed()


def test_sample_and_evaluate_pick_the_gpu_when_present(monkeypatch):
    from facediff.runs.load import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_evaluate_cli_prints_its_protocol_and_saves_it_with_the_value(tiny_export, synthetic_shards, tmp_path):
    """The distance comes with what it measured (split, sample count, sampler, steps, metric, weights), printed
    before sampling and written atomically into the evaluated folder as evaluation.json."""
    import subprocess
    from datetime import datetime

    from conftest import REPO

    exported = shutil.copytree(tiny_export, tmp_path / "model")  # evaluate writes evaluation.json into it
    result = CliRunner().invoke(app, ["evaluate", str(exported), "--set", "eval.num_samples=6",
                                      "--set", "eval.sampler=dpm++", "--memorisation",
                                      "--set", "eval.memorisation_train_cap=8"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    metrics = json.loads(lines[-1])
    memorised = {k: metrics.pop(k) for k in list(metrics) if k.startswith("memorisation_")}
    # the labelled fallback (not fid), its kernel distance beside it, each with a bootstrap interval
    assert set(metrics) == {f"{k}{end}" for k in ("fd_mtcnn_onet", "kd_mtcnn_onet") for end in ("", "_lo", "_hi")}
    # the memorisation audit of the same 6 samples: an untrained model copies no training face
    assert memorised["memorisation_fraction"] == 0.0 and memorised["memorisation_threshold"] > 0
    memorisation_line = next(line for line in lines if line.startswith("memorisation "))
    assert memorisation_line.startswith("memorisation 0 (of 6 samples, the share closer to one of 8 training faces")
    assert "fallback features: random-init InceptionResnetV1" in memorisation_line
    assert f"closest pairs in {exported / 'memorisation_pairs.png'}" in memorisation_line
    assert metrics["fd_mtcnn_onet"] > 0 and metrics["fd_mtcnn_onet_lo"] < metrics["fd_mtcnn_onet_hi"]
    assert metrics["kd_mtcnn_onet_lo"] < metrics["kd_mtcnn_onet_hi"]
    saved = json.loads((exported / "evaluation.json").read_text())
    assert saved["metric"] == "fd_mtcnn_onet" and saved["value"] == metrics["fd_mtcnn_onet"]
    value_line = (f"fd_mtcnn_onet {saved['value']:.6g} [{metrics['fd_mtcnn_onet_lo']:.6g}, "
                  f"{metrics['fd_mtcnn_onet_hi']:.6g}] (95%)")
    assert saved["results"] == metrics | memorised and value_line in lines
    assert saved["memorisation"] == {"features": "random_init", "train_faces": 8, "train_cap": 8, "heldout_faces": 4,
                                     "samples": 6, "heldout_percentile": 1.0, "face_size": 160,
                                     "pairs_png": str(exported / "memorisation_pairs.png")}
    width, height = Image.open(exported / "memorisation_pairs.png").size
    assert height > 2 * width  # 6 pairs, one a row
    assert f"kd_mtcnn_onet {metrics['kd_mtcnn_onet']:.6g} [" in result.output
    assert f"saved in {exported / 'evaluation.json'}" in lines
    test_records = json.loads((synthetic_shards / "manifest.json").read_text())["counts"]["test"]
    protocol = saved["protocol"]
    assert {k: protocol[k] for k in ("split", "split_records", "num_samples", "samples_from", "sampler", "steps",
                                     "seed", "image_size")} == {
        "split": "test", "split_records": test_records, "num_samples": 6, "samples_from": "eval.num_samples",
        "sampler": "dpm++", "steps": 2, "seed": 1234, "image_size": 32}
    assert protocol["bootstrap_resamples"] == 200
    # the real split's features were extracted once and cached beside the dataset for the next evaluation
    assert (synthetic_shards / "real_features" / "test-mtcnn_onet-32px.safetensors").is_file()
    assert protocol["model"] == {"kind": "export", "path": str(exported),
                                 "weights": "ema (exported at the end of training)"}
    assert saved["overrides"] == ["eval.num_samples=6", "eval.sampler=dpm++", "eval.memorisation_train_cap=8"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert saved["facediff_commit"] == head and datetime.fromisoformat(saved["date"]).tzinfo is not None
    assert f"model: exported EMA weights in {exported}" in lines
    assert f"real: split 'test' of {synthetic_shards} ({test_records} records, 32 px)" in lines
    assert any(line.startswith("samples: 6 (eval.num_samples), sampler dpm++, 2 steps, seed 1234") for line in lines)
    assert any(line.startswith("metric: fd_mtcnn_onet (not FID") for line in lines)
    assert lines.index(f"model: exported EMA weights in {exported}") < lines.index(value_line)  # protocol first
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".evaluation.json")]  # no temp left

    bad = CliRunner().invoke(app, ["evaluate", str(exported), "--out", str(tmp_path)])  # a folder: before sampling
    assert bad.exit_code == 2 and f"--out {tmp_path}: not a .json file name" in bad.output


def test_sample_names_what_is_missing(tmp_path):
    result = CliRunner().invoke(app, ["sample", str(tmp_path)])
    assert result.exit_code == 2 and "neither a run folder" in result.output


# ---------------------------------------------------------------------------------- evaluation dealt by id
class _RecordingTask:
    def __init__(self):
        self.ids = []

    def sample(self, n, generator, sampler, steps, batch):
        assert len(batch["id"]) == n
        self.ids += batch["id"].tolist()
        return torch.zeros(n, 3, 8, 8)


class _RecordingMetric:
    name, real_from_cache = "fd_test", False

    def __init__(self):
        self.real = 0

    def update_real(self, images):
        self.real += len(images)

    def update_fake(self, images):
        pass

    def compute_all(self, bootstrap, seed):
        return {self.name: 0.0}

    def reset_fake(self):
        pass


def _stream(ids: np.ndarray, batch: int):
    def batches():
        for start in range(0, len(ids), batch):
            chunk = torch.as_tensor(ids[start:start + batch])
            yield {"id": chunk, "image": torch.zeros(len(chunk), 3, 8, 8)}
    return batches


@pytest.mark.parametrize("num_samples", [None, 7, 150])
def test_each_test_record_is_evaluated_by_exactly_one_rank(tiny_config, num_samples):
    """Two ranks read the split in different orders (as Ray Data hands it out): dealt by id, the records they
    evaluate partition the split (dealt by position, 1,093 of 3,000 were skipped and 827 doubled)."""
    from facediff.eval.evaluate import evaluate_task
    from facediff.data.hashing import owned_by

    cfg = tiny_config([f"eval.num_samples={num_samples if num_samples else 'null'}"])
    ids = np.random.default_rng(0).choice(30_000, size=100, replace=False)
    orders = [ids, np.random.default_rng(1).permutation(ids)]
    tasks, metrics = [_RecordingTask(), _RecordingTask()], [_RecordingMetric(), _RecordingMetric()]
    for rank in (0, 1):
        evaluate_task(tasks[rank], cfg, _stream(orders[rank], 16), metrics[rank], rank=rank, world=2)
    assert metrics[0].real + metrics[1].real == len(ids)  # real statistics: every record once
    made = tasks[0].ids + tasks[1].ids
    if num_samples is None:
        assert sorted(made) == sorted(ids.tolist())  # one sample per record, none twice
    else:
        assert len(made) == num_samples and set(tasks[0].ids).isdisjoint(tasks[1].ids)
        assert abs(len(tasks[0].ids) - len(tasks[1].ids)) <= 1
    owners = owned_by(ids, 0, 2)
    assert 30 < int(owners.sum()) < 70  # dealt roughly evenly
