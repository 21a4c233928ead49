"""Training infrastructure of ``python -m ltlib.run``.

* :mod:`ltlib.training.train`: ``train(cfg, output_dir)``, one configured training + evaluation, and the
  process plumbing around it (DDP rank, orphan watchdog, SIGTERM, the resumed metrics log);
* :mod:`ltlib.training.callbacks`: fault tolerance (per-epoch seeding, non-finite loss guard, atomic
  checkpoints, flushed logs, the config in every checkpoint);
* :mod:`ltlib.training.speed`: ``trainer=gpu_fast`` (bf16, channels_last, torch.compile, sync-free
  metrics) and the phase timer of ``callbacks=timing``.
"""
