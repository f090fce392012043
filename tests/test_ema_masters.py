"""The EMA averages DeepSpeed's fp32 master weights, each rank its own ZeRO partition, assembled by `gather()`:
two gloo ranks in forked processes (no Ray), bf16, ZeRO 0, 2 and 3."""

import os

import pytest
import torch
from torch import nn

from facediff.config.schema import EMAConfig
from forked_ranks import run_forked_ranks

DECAY, STEPS = 0.9, 6


def _rank(rank, world, port, stage, out):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads them
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        from facediff.train.ema import EMA

        torch.manual_seed(0)  # the same initial weights on both ranks
        # odd sizes, so ZeRO's partitions cut parameters in the middle
        net = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2)
        config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
        ema = EMA(engine.module, EMAConfig(decay=DECAY, warmup=False), engine.optimizer)
        params = [p for p in engine.module.parameters() if p.requires_grad]

        def masters():  # the full fp32 master weights, assembled by DeepSpeed itself (a collective)
            if stage == 0:  # FP16_UnfusedOptimizer (torch's AdamW): fp32 copies, whole on every rank
                return [m.detach().clone().view(-1) for m in engine.optimizer.fp32_groups[0]]
            return [safe_get_full_fp32_param(p).detach().float().clone().view(-1) for p in params]

        reference = masters()
        from_bf16 = [m.clone() for m in reference]  # what averaging the module's bf16 copies gives
        generator = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            x = torch.randn(4, 7, generator=generator).to(torch.bfloat16)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            ema.update(engine.module)
            reference = [r.lerp(m, 1 - DECAY) for r, m in zip(reference, masters())]
            full = []
            for p in params:  # the module's bf16 weights, whole
                with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else torch.no_grad():
                    full.append(p.detach().float().clone().view(-1))
            from_bf16 = [b.lerp(f, 1 - DECAY) for b, f in zip(from_bf16, full)]
        if ema.partial:
            with pytest.raises(RuntimeError, match="gather"):
                ema.state_dict()  # read before the parts are assembled: refused
        ema.gather()
        state = ema.state_dict()
        ours = max(float((state[f"ema.{n}"].view(-1) - r).abs().max()) for n, r in zip(ema.names, reference))
        bf16 = max(float((b - r).abs().max()) for b, r in zip(from_bf16, reference))
        out.put((rank, ours, bf16, ema.from_masters, ema.partial))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ema_follows_the_fp32_masters_not_their_bf16_copies(stage):
    results = run_forked_ranks(_rank, 2, (stage,), timeout=240)
    for rank, ours, bf16, from_masters, partial in results:
        assert from_masters and partial == (stage > 0)  # ZeRO splits the masters across the two ranks
        # equal to the average of the fp32 masters (summation order aside), on every rank...
        assert ours < 1e-6, (stage, rank, ours)
        # ...where averaging the bf16 copies is off by bf16's rounding (~1e-3 at these weights' scale)
        assert bf16 > 1e-4, (stage, rank, bf16)
