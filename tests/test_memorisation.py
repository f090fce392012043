"""The memorisation audit tells a model that hands back its training faces from one that draws noise (no Ray: the
audit reads the shards in this process and embeds with a random-init InceptionResnetV1, the labelled fallback)."""

import numpy as np
import pytest
import torch
from PIL import Image

from facediff.eval.memorisation import Audited, MemorisationAudit, build_audit, memorisation_line, train_batches

TRAIN_CAP = 12  # faces embedded: enough for a nearest neighbour, few enough for a cheap CPU test


class CopyingModel:
    """A "model" whose samples are the training faces it was trained on, in the audit's training order."""

    def __init__(self, faces: torch.Tensor):
        self.faces, self.drawn = faces, 0

    def sample(self, n, generator, sampler, steps, batch=None):
        out = self.faces[self.drawn:self.drawn + n]
        self.drawn += n
        return out


class NoiseModel:
    def sample(self, n, generator, sampler, steps, batch=None):
        return torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def audited(synthetic_shards):
    from conftest import REPO

    from facediff.config import load_config

    cfg = load_config(REPO / "configs/experiments/tiny/tiny_unet.yaml",
                      [f"data.path={synthetic_shards}", f"eval.memorisation_train_cap={TRAIN_CAP}"])
    return cfg, build_audit(cfg, None, "cpu")


def test_the_audit_tells_a_copying_model_from_a_noise_model(audited, tmp_path):
    cfg, built = audited
    faces = torch.cat([b["image"] for b in train_batches(cfg)()])[:TRAIN_CAP].float()
    copying = MemorisationAudit(built.embedder, built.train, built.heldout)
    noise = MemorisationAudit(built.embedder, built.train, built.heldout)
    model, generator = Audited(CopyingModel(faces), copying), torch.Generator().manual_seed(0)
    for _ in range(2):  # two batches, as evaluate_task draws them
        model.sample(4, generator, "ddim", 2)
        Audited(NoiseModel(), noise).sample(4, generator, "ddim", 2)
    copied, drawn = copying.compute(), noise.compute()

    assert len(built.train) == TRAIN_CAP and len(built.heldout) == 4  # the cap holds; the whole test split
    assert copied["memorisation_fraction"] == 1.0 and drawn["memorisation_fraction"] == 0.0
    assert copied["memorisation_threshold"] == drawn["memorisation_threshold"] > 0  # from held-out faces alone
    assert copied["memorisation_median_to_train"] < 1e-4 * copied["memorisation_heldout_median_to_train"]
    assert drawn["memorisation_median_to_train"] > drawn["memorisation_heldout_median_to_train"]
    assert copied["memorisation_median_to_heldout"] > copied["memorisation_median_to_train"]

    # the pairs PNG: each copy beside the very training face it copies (2 columns, one pair a row)
    saved = copying.save_pairs(train_batches(cfg), tmp_path / "pairs.png")
    picture = np.asarray(Image.open(saved))
    pixels = ((faces.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert len(copying.closest) == 8 and all(np.array_equal(img, pixels[i]) for _, i, img in copying.closest)
    assert picture.shape[0] > picture.shape[1] * 3  # 8 rows of 2 tiles

    line = memorisation_line({"results": copied, "memorisation": {**copying.describe(TRAIN_CAP), "pairs_png": saved}})
    assert line.startswith(f"memorisation 1 (of 8 samples, the share closer to one of {TRAIN_CAP} training faces")
    assert "fallback features: random-init InceptionResnetV1" in line and str(saved) in line


def test_the_held_out_split_cannot_be_the_training_split(audited):
    cfg, _ = audited
    with pytest.raises(ValueError, match="held-out split 'train' is the training split"):
        build_audit(cfg, "train", "cpu")


def test_named_embedding_weights_must_be_an_inception_resnet_state_dict(tmp_path):
    from facediff.eval.memorisation import FaceEmbedder

    with pytest.raises(FileNotFoundError, match=f"eval.face_embedding_weights .*looked at {tmp_path / 'none.pt'}"):
        FaceEmbedder(str(tmp_path / "none.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"eval.face_embedding_weights={tmp_path / 'other.pt'}: not an "
                                         "InceptionResnetV1 state_dict"):
        FaceEmbedder(str(tmp_path / "other.pt"))


def test_the_embeddings_are_cached_beside_the_dataset_and_rebuilt_for_a_new_manifest(synthetic_shards, tmp_path,
                                                                                     monkeypatch):
    """Each split is embedded once per (manifest, split, cap, weights, size): a second audit embeds nothing, reads
    back exactly what was computed, and a dataset prepared again (another manifest hash) is embedded afresh."""
    import shutil

    from conftest import REPO

    from facediff.config import load_config
    from facediff.eval.memorisation import FaceEmbedder
    from facediff.eval.real_stats import RealFeaturesKey, load_real_features

    dataset = shutil.copytree(synthetic_shards, tmp_path / "shards", ignore=shutil.ignore_patterns("real_features"))
    cfg = load_config(REPO / "configs/experiments/tiny/tiny_unet.yaml",
                      [f"data.path={dataset}", "eval.memorisation_train_cap=3"])
    embedded, forward = [], FaceEmbedder.forward
    monkeypatch.setattr(FaceEmbedder, "forward", lambda self, images: embedded.append(len(images)) or
                        forward(self, images))

    first = build_audit(cfg, None, "cpu")
    assert sum(embedded) == 3 + 4  # the capped training split and the 4 held-out faces
    identity = first.embedder.identity
    assert identity == f"inception_resnet_v1-random_init-seed0-torch{torch.__version__}"  # the labelled fallback
    files = sorted(p.name for p in (dataset / "real_features").iterdir())
    assert files == [f"test-{identity}-32px.safetensors", f"train-first3-{identity}-32px.safetensors"]

    embedded.clear()
    second = build_audit(cfg, None, "cpu")
    assert embedded == []  # nothing embedded again
    assert torch.equal(second.train, first.train) and torch.equal(second.heldout, first.heldout)  # as computed

    (dataset / "manifest.json").write_text((dataset / "manifest.json").read_text() + "\n")  # prepared again
    embedded.clear()
    build_audit(cfg, None, "cpu")
    assert sum(embedded) == 3 + 4
    assert load_real_features(RealFeaturesKey(str(dataset), "train", identity, 32, 3)) is not None  # new hash
