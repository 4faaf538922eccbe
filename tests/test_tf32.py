"""The tf32 switch of sample and cache-latents (default on, as the official sampler): flags set on CUDA only."""

from __future__ import annotations

import torch

from rae_cli import distributed
from rae_cli.config import resolve
from rae_cli.latent_cache import CacheLatentsConfig
from rae_cli.sample import SampleConfig


def test_set_tf32_touches_cuda_flags_only_for_cuda_devices():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        distributed.set_tf32(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        distributed.set_tf32(torch.device("cpu"), False)  # no effect off CUDA
        assert torch.backends.cuda.matmul.allow_tf32
        distributed.set_tf32(torch.device("cuda", 0), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_defaults_on_and_reaches_the_commands(monkeypatch, tmp_path):
    assert resolve(SampleConfig).tf32 and resolve(CacheLatentsConfig).tf32
    assert resolve(SampleConfig, preset="dit-dh-xl_in256").tf32
    seen = []
    monkeypatch.setattr(distributed, "set_tf32", lambda device, enabled: seen.append(enabled))
    from rae_cli.sample import sample

    cfg = resolve(SampleConfig, preset="tiny", overrides=["dit_random_init=true", "num_images=1", "num_steps=2",
                                                          "tf32=false", "decode=false", "latent_shape=[32,4,4]",
                                                          "num_classes=2", "npz=false", "grid_images=0"])
    sample(cfg, tmp_path / "s")
    assert seen == [False]
