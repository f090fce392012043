"""facediff.data.prepare.latents (`prepare latents`) and streaming cached latents with data.use_latents."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facediff.config.schema import AutoencoderConfig
from facediff.data.shards import SHARD_SCHEMA, ShardWriter, latent_schema, read_manifest, shard_paths
from facediff.data.stream.batch import finish_batch, images_to_float
from facediff.data.stream.dataset import build_dataset, decode_batch, flip_decisions, iter_train_batches
from facediff.models.autoencoder import LatentCodec

from conftest import REPO

AE = AutoencoderConfig(kind="vq", preset="tiny_vq")
SHAPE = (3, 8, 8)  # tiny_vq at 32 px


def rows(dataset, split, columns=None):
    """A split's rows as numpy columns (decode_batch's input), in shard order."""
    table = pq.read_table(shard_paths(dataset, split), columns=columns)
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


@pytest.fixture(scope="module")
def latent_shards(ray_cluster, synthetic_shards, tmp_path_factory):
    from facediff.data.prepare.latents import prepare_latents

    out = tmp_path_factory.mktemp("latents") / "vq"
    prepare_latents(synthetic_shards, out, AE, batch_size=16, progress=False)
    return out


@pytest.mark.ray
def test_prepare_latents_equal_the_codec_and_keep_every_column(synthetic_shards, latent_shards):
    manifest = read_manifest(latent_shards)
    source = read_manifest(synthetic_shards)
    assert manifest["counts"] == source["counts"] and manifest["counts"]["train"] == 44
    info = manifest["latents"]
    assert info["shape"] == list(SHAPE) and info["dtype"] == "float16" and info["flipped"] is True
    assert info["image_size"] == 32 and info["autoencoder"]["preset"] == "tiny_vq" and info["scaling_factor"] == 1.0

    codec = LatentCodec(AE, load_weights=False)
    for split in ("train", "test"):
        before, after = rows(synthetic_shards, split), rows(latent_shards, split)
        assert after["id"].tolist() == before["id"].tolist()  # every row, in the source order
        for column in ("image", "parts", "split"):
            assert after[column].tolist() == before[column].tolist(), column
        assert np.array_equal(np.stack(after["attributes"]), np.stack(before["attributes"]))
        assert pq.read_schema(shard_paths(latent_shards, split)[0]).field("latents").type == pa.list_(pa.float16(), 192)

    batch = rows(latent_shards, "train")
    picked = {k: v[[0, 7, 30]] for k, v in batch.items()}  # ids from several shards
    images = images_to_float(torch.from_numpy(decode_batch(picked, image_size=32, hflip=False, seed=0,
                                                           epoch=0)["image"]))
    cached = np.stack(picked["latents"]).astype(np.float32).reshape(3, *SHAPE)
    cached_flipped = np.stack(picked["latents_flipped"]).astype(np.float32).reshape(3, *SHAPE)
    # float16 keeps ~11 significant bits: 1e-3 relative
    np.testing.assert_allclose(cached, codec.encode(images).numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cached_flipped, codec.encode(images.flip(-1)).numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(cached, cached_flipped, atol=1e-2)  # the mirrored image really was encoded


@pytest.mark.ray
def test_streaming_with_use_latents_gives_the_flipped_rows_mirrored_latents(latent_shards):
    ds = build_dataset(latent_shards, "train", image_size=32, hflip=True, seed=3, use_latents=True)
    got = {}
    for batch in iter_train_batches(ds, batch_size=11, drop_last=False):
        assert batch["latents"].dtype == torch.float32 and batch["latents"].shape[1:] == SHAPE
        assert batch["image"].shape[1:] == (3, 32, 32)
        got.update(zip(batch["id"].tolist(), batch["latents"]))
    stored = rows(latent_shards, "train")
    assert sorted(got) == sorted(stored["id"].tolist())
    flips = flip_decisions(stored["id"], seed=3, epoch=0)
    assert 0 < flips.sum() < len(flips)
    for row, (image_id, flip) in enumerate(zip(stored["id"], flips)):
        want = stored["latents_flipped" if flip else "latents"][row].astype(np.float32).reshape(SHAPE)
        np.testing.assert_array_equal(got[int(image_id)].numpy(), want)


@pytest.mark.ray
def test_use_latents_refuses_shards_that_cannot_serve_it(synthetic_shards, latent_shards, tmp_path):
    with pytest.raises(ValueError, match="no cached latents.*prepare latents"):
        build_dataset(synthetic_shards, "train", image_size=32, use_latents=True)
    with pytest.raises(ValueError, match="encoded at 32 px, but image_size is 64"):
        build_dataset(latent_shards, "train", image_size=64, use_latents=True)
    unflipped = tmp_path / "unflipped"
    shutil.copytree(latent_shards, unflipped)
    manifest = json.loads((unflipped / "manifest.json").read_text())
    manifest["latents"]["flipped"] = False
    (unflipped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="mirrored images were not cached.*data.hflip=false"):
        build_dataset(unflipped, "train", image_size=32, hflip=True, use_latents=True)
    # Without use_latents the latent columns are not read and the batch is the usual one.
    batch = next(iter_train_batches(build_dataset(latent_shards, "test", image_size=32, hflip=False), batch_size=4))
    assert "latents" not in batch and batch["image"].shape == (4, 3, 32, 32)


def test_mismatched_latent_column_is_a_clear_error(synthetic_shards):
    batch = rows(synthetic_shards, "test")
    batch["latents"] = np.zeros((len(batch["id"]), 100), np.float16)  # 100 values, not 3*8*8
    kw = dict(image_size=32, hflip=False, seed=0, epoch=0, latent_shape=SHAPE)
    with pytest.raises(ValueError, match=r"column 'latents': expected shape \(B, 192\), got \(4, 100\).*3x8x8"):
        decode_batch(batch, **kw)
    del batch["latents"]
    with pytest.raises(ValueError, match="no 'latents' column"):
        decode_batch(batch, **kw)
    batch["latents"] = np.zeros((len(batch["id"]), 192), np.float16)
    with pytest.raises(ValueError, match="no 'latents_flipped' column"):
        seed = next(s for s in range(100) if flip_decisions(batch["id"], seed=s, epoch=0).any())
        decode_batch(batch, **{**kw, "hflip": True, "seed": seed})


def test_shard_writer_mixes_records_and_tables_in_order(tmp_path):
    schema = latent_schema(2, "float32")
    def record(i):
        return {"id": i, "image": b"i", "parts": b"p", "attributes": [0] * 40, "split": "train", "latents": [i, -i]}
    writer = ShardWriter(tmp_path, "train", rows_per_shard=4, schema=schema)
    writer.write(record(0))
    writer.write_table(pa.Table.from_pylist([record(i) for i in range(1, 7)], schema=schema))
    writer.write(record(7))
    writer.write(record(8))
    files = writer.close()
    assert [f["rows"] for f in files] == [4, 4, 1]
    table = pq.read_table([str(tmp_path / f["path"]) for f in files])
    assert table["id"].to_pylist() == list(range(9)) and table["latents"].to_pylist()[5] == [5.0, -5.0]
    assert table.schema.field("latents").type == pa.list_(pa.float32(), 2)
    assert SHARD_SCHEMA.names == table.schema.names[:5]


LC_CONFIG = """name: lc_test
model:
  family: lc_unet
  down_block_types: [DownBlock2D, CrossAttnDownBlock2D]
  up_block_types: [CrossAttnUpBlock2D, UpBlock2D]
  block_out_channels: [32, 64]
  autoencoder: {preset: tiny_vq, kind: vq}
"""


def test_cli_prepare_latents_options_and_config(synthetic_shards, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import facediff.data.prepare.latents as latents
    from facediff.cli.main import app

    calls = []

    def fake(shards, out, autoencoder, **kw):
        calls.append((autoencoder, kw))
        return {"counts": {"train": 1}, "latents": {"shape": [3, 8, 8], "dtype": kw["dtype"], "seconds": 0.0}}

    run = CliRunner().invoke
    real = latents.prepare_latents
    monkeypatch.setattr(latents, "prepare_latents", fake)
    result = run(app, ["prepare", "latents", "in", "out", "--preset", "tiny_kl", "--kind", "kl", "--dtype", "float32",
                       "--no-flipped", "--actors", "2"])
    assert result.exit_code == 0, result.output
    assert calls[-1][0] == AutoencoderConfig(kind="kl", preset="tiny_kl")
    assert {k: calls[-1][1][k] for k in ("dtype", "flipped", "num_actors", "use_gpu")} == {
        "dtype": "float32", "flipped": False, "num_actors": 2, "use_gpu": False}
    assert "3x8x8 float32 latents" in result.output

    config = tmp_path / "lc.yaml"
    config.write_text(LC_CONFIG)
    result = run(app, ["prepare", "latents", "in", "out", "--config", str(config), "--scaling-factor", "0.3"])
    assert result.exit_code == 0, result.output
    assert calls[-1][0] == AutoencoderConfig(kind="vq", preset="tiny_vq", scaling_factor=0.3)  # option overrides

    tiny_unet = str(REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml")
    result = run(app, ["prepare", "latents", "in", "out", "--config", tiny_unet])
    assert result.exit_code == 2 and "its model denoises pixels and has no autoencoder" in result.output
    sd_lora = str(REPO / "configs" / "experiments" / "tiny" / "tiny_sd_lora.yaml")
    result = run(app, ["prepare", "latents", "in", "out", "--config", sd_lora, "--no-prompt-embeddings"])
    assert result.exit_code == 0, result.output
    assert calls[-1][0] == AutoencoderConfig(kind="kl", preset="tiny_sd/vae")  # the pipeline's own VAE
    controlnet = str(REPO / "configs" / "experiments" / "tiny" / "tiny_controlnet.yaml")
    result = run(app, ["prepare", "prompt-embeddings", str(synthetic_shards), "--config", controlnet])
    assert result.exit_code == 2 and "cached prompt embeddings are for sd_lora's attribute prompts" in result.output
    result = run(app, ["prepare", "latents", "in", "out"])
    assert result.exit_code == 2 and "give a `preset`" in result.output
    assert len(calls) == 3

    monkeypatch.setattr(latents, "prepare_latents", real)  # the real job refuses a wrong kind before Ray starts
    result = run(app, ["prepare", "latents", str(synthetic_shards), str(tmp_path / "o"), "--preset", "sd2_vae"])
    assert result.exit_code == 2 and "is a AutoencoderKL, but the autoencoder config says kind 'vq'" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_cached_latents_must_come_from_the_models_autoencoder(latent_shards, tmp_path):
    """Latents of another autoencoder, or another scale, would train a model whose samples decode to nonsense."""
    from facediff.data.prepare.latents import check_cached_latents

    check_cached_latents(latent_shards, AE)  # the autoencoder they were written with
    with pytest.raises(ValueError, match=r"encoded with autoencoder kind='vq', but model\.autoencoder\.kind is 'kl'"):
        check_cached_latents(latent_shards, AutoencoderConfig(kind="kl", preset="tiny_kl"))
    with pytest.raises(ValueError, match=r"autoencoder pretrained=None, but model\.autoencoder\.pretrained"):
        check_cached_latents(latent_shards, AutoencoderConfig(kind="vq", preset="tiny_vq", pretrained=str(tmp_path)))
    with pytest.raises(ValueError, match=r"scaled by 1\.0, but .*scaling_factor=0\.5"):
        check_cached_latents(latent_shards, AutoencoderConfig(kind="vq", preset="tiny_vq", scaling_factor=0.5))


@pytest.mark.ray
def test_sd_lora_trains_on_latents_cached_with_its_pipelines_vae(ray_session, synthetic_shards, tmp_path):
    """`prepare latents --config` of an SD config caches the pipeline's own VAE latents: the task's loss on them
    equals its loss encoding the same images on the fly, and the cache check names a mismatched pipeline."""
    from facediff.config import load_config
    from facediff.config.schema import model_autoencoder
    from facediff.data.prepare.latents import check_cached_latents, prepare_latents
    from facediff.tasks import build_task

    config = REPO / "configs/experiments/tiny/tiny_sd_lora.yaml"
    cfg = load_config(config, ["model.prompt_dropout=0"])
    autoencoder = model_autoencoder(cfg.model)
    assert (autoencoder.kind, autoencoder.preset, autoencoder.subfolder) == ("kl", "tiny_sd/vae", None)
    out = tmp_path / "sd"
    prepare_latents(synthetic_shards, out, autoencoder, batch_size=16, progress=False)
    assert read_manifest(out)["latents"]["shape"] == [4, 8, 8]
    check_cached_latents(out, autoencoder)
    with pytest.raises(ValueError, match=r"autoencoder preset='tiny_sd/vae', but model\.autoencoder\.preset is 'tiny_kl'"):
        check_cached_latents(out, AutoencoderConfig(kind="kl", preset="tiny_kl"))

    picked = {k: v[:6] for k, v in rows(out, "train").items()}
    decoded = decode_batch(picked, image_size=32, hflip=False, seed=0, epoch=0,
                           latent_shape=(4, 8, 8))
    cached_cfg = load_config(config, ["model.prompt_dropout=0", f"data.path={out}", "data.use_latents=true"])
    on_the_fly, cached = build_task(cfg), build_task(cached_cfg)
    batch = finish_batch({k: torch.from_numpy(decoded[k]) for k in ("image", "attributes", "latents")})
    expected = on_the_fly.backbone.encode_images(batch["image"])
    assert torch.allclose(batch["latents"], expected, atol=2e-3 * expected.abs().max().item())
    losses = [task(batch, torch.Generator().manual_seed(3)).item() for task in (on_the_fly, cached)]
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-2)
    no_images = {"attributes": batch["attributes"], "latents": batch["latents"]}
    assert cached(no_images, torch.Generator().manual_seed(3)).item() == pytest.approx(losses[1])

    # the prompts' text embeddings cached beside the latents: the step reads them and never runs the text encoder
    from facediff.data.prompt_embeddings import check_prompt_embeddings, write_prompt_embeddings

    manifest = write_prompt_embeddings(out, cached_cfg.model, dtype="float32")
    distinct = {"", cfg.model.placeholder_prompt, *cached.prompts(torch.tensor(np.stack(rows(out, "train")["attributes"])))}
    assert manifest["prompt_embeddings"]["prompts"] >= len(distinct) > 2
    with_text = build_task(cached_cfg)
    with_text.backbone._encode_uncached = None  # calling the text encoder would raise
    assert with_text(no_images, torch.Generator().manual_seed(3)).item() == pytest.approx(losses[0], rel=1e-2)
    prompts = cached.prompts(batch["attributes"]) + [""]
    assert torch.allclose(with_text.prompt_context(prompts), on_the_fly.backbone.encode_prompts(prompts), atol=1e-5)
    reworded = load_config(config, [f"data.path={out}", "data.use_latents=true", "model.prompt_template=A face with {attributes}"])
    with pytest.raises(ValueError, match=r"prompt_embeddings\.safetensors: the prompt embeddings were made for "
                                         r"model\.prompt_template=.*run `facediff prepare prompt-embeddings"):
        check_prompt_embeddings(out, reworded.model)


@pytest.mark.ray
def test_controlnet_trains_on_cached_latents_of_people_scenes(ray_session, coco_shards, tmp_path):
    """COCO people shards get the pipeline VAE's latents (and the mirrored images'); a ControlNet step on them
    equals one encoding the images, which the batch still carries for the perceptual losses and the person map."""
    from facediff.config import load_config
    from facediff.config.schema import model_autoencoder
    from facediff.data.prepare.latents import prepare_latents
    from facediff.tasks import build_task

    config = REPO / "configs/experiments/tiny/tiny_controlnet.yaml"
    overrides = ["model.prompt_dropout=0", "loss.perceptual_timestep_threshold=1000"]
    cfg = load_config(config, overrides)
    out = tmp_path / "coco-sd"
    prepare_latents(coco_shards, out, model_autoencoder(cfg.model), batch_size=8, dtype="float32", progress=False)
    manifest = read_manifest(out)
    assert manifest["kind"] == "coco_people" and manifest["latents"]["shape"] == [4, 16, 16]
    picked = {k: v[:4] for k, v in rows(out, "train").items()}
    seed = next(s for s in range(64) if 0 < flip_decisions(picked["id"], seed=s, epoch=0).sum() < 4)
    decoded = decode_batch(picked, image_size=64, hflip=True, seed=seed, epoch=0, latent_shape=(4, 16, 16))
    assert 0 < decoded["flipped"].sum() < 4 and {"persons", "face_boxes", "caption"} <= set(decoded)
    batch = finish_batch({k: torch.from_numpy(v) for k, v in decoded.items()})
    on_the_fly = build_task(cfg)
    cached = build_task(load_config(config, [*overrides, f"data.path={out}", "data.use_latents=true"]))
    expected = on_the_fly.backbone.encode_images(batch["image"])  # flipped rows: the mirrored image's latents
    assert torch.allclose(batch["latents"], expected, atol=1e-4 * expected.abs().max().item())
    losses = [task(batch, torch.Generator().manual_seed(5)).item() for task in (on_the_fly, cached)]
    assert cached.loss_terms["loss_lpips"] > 0  # the perceptual terms ran on the cached run's pixels
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-4)
