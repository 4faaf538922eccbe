"""Past one machine: the SLURM / two-host launch scripts (SLURM emulated by its environment variables and stub
``scontrol``/``srun`` commands), a "2 nodes × 1 process" train-dit on one host, and a latent cache whose readers
open only the shards they read (optionally from node-local copies)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_training_helpers import synthetic_cache

REPO = Path(__file__).resolve().parents[1]
MULTINODE = REPO / "examples" / "multinode"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# The latent cache on many nodes: lazy per-shard maps, node-local copies


def _mapped_files() -> set[str]:
    """Files memory-mapped by this process (Linux: /proc/self/maps)."""
    return {line.split(None, 5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(None, 5)) == 6}


def test_a_reader_opens_only_the_shards_its_rows_come_from(tmp_path):
    from rae_cli.errors import DataError
    from rae_cli.latent_cache import LatentCache, shard_name

    root = synthetic_cache(tmp_path / "cache")  # 32 images + mirrors, 10 images (20 rows) per shard: 4 shards
    full = LatentCache(root).read(torch.arange(64))
    # A node that holds shard 1 only (the others deleted): opening the cache and reading rows 20..39 still works.
    for s in (0, 2, 3):
        (root / shard_name(s)).unlink()
    cache = LatentCache(root)
    assert cache.open_shards == []  # opening reads index.json only
    rows = torch.tensor([39, 20, 25])
    lat, lab = cache.read(rows)
    torch.testing.assert_close(lat, full[0][rows], rtol=0, atol=0)
    assert torch.equal(lab, full[1][rows])
    assert cache.open_shards == [root / shard_name(1)]
    if Path("/proc/self/maps").is_file():
        mapped = {m for m in _mapped_files() if m.startswith(str(root))}
        assert mapped == {str(root / shard_name(1))}
    with pytest.raises(DataError, match=shard_name(0)):
        cache.read([0])


def test_node_local_copies_are_made_on_first_use_and_read_instead(tmp_path):
    from rae_cli.latent_cache import LatentCache, shard_name

    root = synthetic_cache(tmp_path / "cache")
    scratch = tmp_path / "scratch"
    rows = torch.tensor([45, 41, 3])  # shards 2 and 0
    want = LatentCache(root).read(rows)
    cache = LatentCache(root, local_dir=scratch)
    got = cache.read(rows)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (sub,) = scratch.iterdir()  # one folder per cache (hash of its path)
    assert sorted(p.name for p in sub.iterdir()) == [shard_name(0), shard_name(2)]  # no temporary left over
    if Path("/proc/self/maps").is_file():
        mapped = _mapped_files()
        assert str(sub / shard_name(2)) in mapped and str(root / shard_name(2)) not in mapped
    # A second reader on the node (another rank, or a restart) reuses the copies; the shared file is not read.
    stamp = (sub / shard_name(2)).stat().st_mtime_ns
    shared = root / shard_name(2)
    st = shared.stat()
    shared.write_bytes(bytes(st.st_size))  # zeros: unreadable if it were opened again ...
    os.utime(shared, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... but the same size and time: the copy stays current
    again = LatentCache(root, local_dir=scratch).read(rows)
    assert torch.equal(again[0], want[0]) and (sub / shard_name(2)).stat().st_mtime_ns == stamp
    # A different cache (here with the very same index.json) never picks up these copies.
    other = synthetic_cache(tmp_path / "other", seed=1)
    assert (other / "index.json").read_text() == (root / "index.json").read_text()
    lat, _ = LatentCache(other, local_dir=scratch).read(rows)
    assert torch.equal(lat, LatentCache(other).read(rows)[0]) and len(list(scratch.iterdir())) == 2
    # A cache rebuilt in place (new shard files) replaces the stale copies.
    synthetic_cache(root, seed=2)
    lat, _ = LatentCache(root, local_dir=scratch).read(rows)
    assert torch.equal(lat, LatentCache(root).read(rows)[0]) and not torch.equal(lat, want[0])


# ---------------------------------------------------------------------------------------------------------------
# SLURM launch logic, emulated: SLURM_* variables, a stub scontrol and srun, a recording torchrun


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin/ folder with ``scontrol`` (expands node[01-03] like SLURM) and ``srun`` (runs its command once per
    node, concurrently, with that node's SLURM_NODEID/SLURM_PROCID), plus the allocation's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    _stub(bin_dir / "scontrol", f"""echo "$*" >> {log}
[ "$1 $2" = "show hostnames" ] || exit 1
case "$3" in
  "node[01-03]") printf 'node01\\nnode02\\nnode03\\n' ;;
  "node[01-02]") printf 'node01\\nnode02\\n' ;;
  *) echo "$3" | tr ',' '\\n' ;;
esac
""")
    _stub(bin_dir / "srun", """while [ "${1#-}" != "$1" ]; do shift; done   # srun's own options
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAE_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-03]",
               SLURM_NNODES="3", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO))
    return env, log


def _recording_torchrun(tmp_path: Path) -> str:
    """A stand-in for torchrun that writes its arguments (one per line) to calls/<SLURM_NODEID>."""
    calls = tmp_path / "calls"
    calls.mkdir()
    _stub(tmp_path / "torchrun", f'printf "%s\\n" "$@" > {calls}/"$SLURM_NODEID"\n'
                                 f'echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > {calls}/"$SLURM_NODEID.share"\n')
    return str(tmp_path / "torchrun")


def test_sbatch_script_starts_one_torchrun_per_node_with_one_rendezvous(tmp_path, fake_slurm):
    env, log = fake_slurm
    env["RAE_TORCHRUN"] = _recording_torchrun(tmp_path)
    proc = subprocess.run(["bash", str(MULTINODE / "rae.sbatch"), "train-dit", "-p", "tiny", "--out", "runs/x",
                           "seed=3"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = {p.name: p.read_text().splitlines() for p in (tmp_path / "calls").iterdir() if "." not in p.name}
    assert sorted(calls) == ["0", "1", "2"]  # one torchrun per node
    assert calls["0"] == calls["1"] == calls["2"]  # ... all with the same rendezvous
    args = calls["0"]
    endpoint = next(a for a in args if a.startswith("--rdzv-endpoint="))
    host, port = endpoint.split("=", 1)[1].split(":")
    assert host == "node01" and 1024 <= int(port) < 65536  # the first node of the list, a port found free
    assert {"--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-id=rae-4242",
            "--max-restarts=3"} <= set(args)
    assert args[args.index("-m"):] == ["-m", "rae_cli", "train-dit", "-p", "tiny", "--out", "runs/x", "seed=3"]
    assert "show hostnames node[01-03]" in log.read_text()
    assert (tmp_path / "calls" / "0.share").read_text().strip() == "1"  # env.sh: a fresh store per restart
    assert "rendezvous node01:" in proc.stderr


def test_per_node_script_settings_and_errors(tmp_path, fake_slurm):
    env, _ = fake_slurm
    env["RAE_TORCHRUN"] = _recording_torchrun(tmp_path)
    node = str(MULTINODE / "torchrun-node.sh")
    # Without rae.sbatch's exports: the first host of the list and the default port; overrides are honoured.
    env.update(SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu7,gpu9", SLURM_NNODES="2", RAE_NNODES="1:2",
               RAE_NPROC_PER_NODE="2", RAE_MAX_RESTARTS="5")
    proc = subprocess.run(["bash", node, "sample", "--out", "s"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "calls" / "1").read_text().splitlines()
    assert {"--rdzv-endpoint=gpu7:29500", "--nnodes=1:2", "--nproc-per-node=2", "--max-restarts=5"} <= set(args)
    # Outside an allocation, or without a command: a clear message, no torchrun.
    bare = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", node, "train-dit"], env=bare, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SLURM" in proc.stderr
    proc = subprocess.run(["bash", node], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Two nodes × one process on one host (two-hosts.sh, a localhost c10d rendezvous) = one process


def test_two_nodes_of_one_process_match_one_process(tmp_path):
    from rae_cli.config import resolve
    from rae_cli.train_dit import TrainDiTConfig, train_dit

    cache = synthetic_cache(tmp_path / "cache")
    overrides = ["max_steps=3", "ckpt_every_steps=2"]
    train_dit(cfg=resolve(TrainDiTConfig, preset="tiny", overrides=[f"cache={cache}", *overrides]),
              out_dir=tmp_path / "one")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HEAD="127.0.0.1", PORT=str(free_port()), NPROC="1",
               RDZV_ID=f"test-{os.getpid()}", RAE_TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    cmd = ["bash", str(MULTINODE / "two-hosts.sh"), "train-dit", "-p", "tiny", "--cache", str(cache), "--out",
           str(tmp_path / "two"), *overrides]
    nodes = [subprocess.Popen(cmd, env={**env, "NODE_RANK": str(r)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "one/checkpoints/step-000000003" / name))
        b = load_file(str(tmp_path / "two/checkpoints/step-000000003" / name))
        for k in a:  # the same samples; only the order of the float sums differs (all-reduce of 2 halves)
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    meta = json.loads((tmp_path / "two/checkpoints/step-000000003/meta.json").read_text())
    assert meta["images_seen"] == 3 * 8
    assert json.loads((tmp_path / "two/checkpoints/step-000000003/meta.json").read_text())["step"] == 3
    resume = torch.load(tmp_path / "two/checkpoints/step-000000003/resume.pt", weights_only=True)
    assert resume["world_size"] == 2
    # Global rank 0 alone wrote the shared files (each node has a LOCAL_RANK 0 here): one metrics line per step.
    lines = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]


def test_workers_warn_when_torchrun_restarts_share_its_store(monkeypatch, caplog):
    from rae_cli.distributed import _warn_shared_rendezvous_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    _warn_shared_rendezvous_store(0)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what torchrun exports once the variable is set
    _warn_shared_rendezvous_store(0)
    assert caplog.text == ""
