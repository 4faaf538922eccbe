"""The training core shared by ``train-dit``, ``train-decoder`` and the overfit probe (one copy of the run machinery).

- :mod:`~rae_cli.training.session`   distributed init/teardown (always in try/finally), precision (autocast, one
                                     GradScaler per optimizer, TF32, torch.compile), ``no_sync`` accumulation, progress
- :mod:`~rae_cli.training.fsdp`      ``parallel=fsdp``: FSDP2 sharding per transformer block, full-state checkpoints
                                     in the DDP layout, the EMA sharded alike, gradient-sync-off accumulation
- :mod:`~rae_cli.training.resume`    the run folder and the ONE resume policy (which keys may change on resume)
- :mod:`~rae_cli.training.guard`     the NaN guard: a non-finite loss, gradient or state is never saved
- :mod:`~rae_cli.training.clock`     when to checkpoint: step/epoch intervals and ``ckpt_every_minutes`` (rank 0 decides)
- :mod:`~rae_cli.training.bad_images` unreadable training images: counted, logged once, replaced deterministically

The trainers keep only what is theirs: the flow-matching step (``train_dit``), the G/D step, losses and export
(``train_decoder``). Checkpoint files and the metrics log live in :mod:`rae_cli.run_dir`.
"""
