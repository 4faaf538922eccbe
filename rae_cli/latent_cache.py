"""The latent cache: images encoded once by the frozen RAE encoder, stored as shards that ``train-dit`` memory-maps
(spec §10.3: the official code re-encodes every image on every step), plus exact per-element latent statistics (§8).

Layout of a cache folder::

    index.json                 manifest, written last: rae config, latent shape, dtype, classes, counts, bad files
    config.yaml                the resolved ``cache-latents`` config
    plan.json                  what fixes the content (settings, file-list hash): a re-run must match it to resume
    files.txt                  ``index<TAB>label<TAB>path`` of every source image (``source`` below points here)
    shard-00000.safetensors    one per ``shard_size`` source images, written atomically
    partial-stats/shard-00000.safetensors   that shard's float64 Σz, Σz² (summed while encoding; written after it)
    stats.safetensors          exact per-element mean/var (float64 sums) of the raw latents: an RAE stats file

A shard is complete iff its file exists. It holds ``latents`` (N, C, h, w) in the cache dtype, ``labels`` (N,) int64,
``flip`` (N,) uint8 and ``source`` (N,) int64, where N = images kept × copies, image-major: with flips, rows 2k and
2k+1 are image k and its horizontal mirror. Its metadata lists the unreadable images it skipped. Latents are **raw**
(the encoder's LayerNorm output, not normalised): ``train-dit`` normalises them with the statistics it is configured
with. Shards are standard safetensors files; for reading, the tensor bytes are memory-mapped directly with numpy
(offsets from the safetensors header), so a random batch is a fancy index into the page cache (bf16 is mapped as
uint16 and re-viewed); a reader opens a shard only when it first reads one of its rows. Work is split over torchrun
processes by shard (the shards left to do, dealt out in turn); the statistics are the sum of the per-shard partials
(:mod:`rae_cli.latent_cache_writer`), never a second pass over the shards. On many nodes the cache folder is one
path every node mounts (a parallel filesystem); readers can copy shards to node-local scratch (:class:`LatentCache`
``local_dir``).
"""

# The two sides live in their own modules; their names are re-exported here, where they always were.
from rae_cli.latent_cache_read import (  # noqa: F401
    _ST_DTYPES, CACHE_FORMAT, CACHE_VERSION, FILES_FILE, INDEX_FILE, PLAN_FILE, STATS_FILE, LatentCache, _as_float,
    _read_header, _shard_intact, read_shard_arrays, shard_name)
from rae_cli.latent_cache_write import (  # noqa: F401
    DTYPES, CacheLatentsConfig, _check_or_write_plan, _collate, _content_plan, _encode_shards, _exact_stats, _finish,
    _ImageFiles, _progress, _shard_batches, _shard_indices, _write_file_list, _write_index, cache_latents, write_cache)
