"""Bad input files offered to the real CLI: unusable images (encode, recon, cache-latents) and a malicious pickle
``.pt`` at every place a ``.pt`` is accepted. Each must end in a clear one-line error (or, in cache-latents, a
counted skip), with nothing executed and no partial output."""

from __future__ import annotations

import json

import pytest

from dit_training_helpers import image_folder
from faults.fault_helpers import BAD_KINDS, error_line, explain, malicious_pt, write_bad_image


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("good") / "images", per_class=2, classes=1)


@pytest.mark.parametrize("command", ["encode", "recon"])
def test_encode_and_recon_name_every_bad_image_and_write_nothing(command, good, tmp_path, rae_cli_run,
                                                                 fault_report):
    rows = {kind: fault_report.injected(f"rae {command}: {kind} image among good ones") for kind in BAD_KINDS}
    folder = tmp_path / "in"
    for f in good.rglob("*.png"):
        (folder / f.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    bad = {kind: write_bad_image(folder / f"bad_{kind}.png", kind) for kind in BAD_KINDS}
    proc = rae_cli_run([command, folder, "--out", tmp_path / "out", "-p", "tiny"])
    assert proc.returncode == 2, explain(proc)
    line = error_line(proc)
    assert f"{len(BAD_KINDS)} of {len(BAD_KINDS) + 2} input images cannot be used" in line, line
    assert not (tmp_path / "out").exists()  # checked before anything was written
    for kind, path in bad.items():
        if f"cannot read image {path}" in line:
            rows[kind].survived = True
    assert all(row.survived for row in rows.values()), line


def test_cache_latents_skips_and_counts_every_kind_of_bad_image(tmp_path, rae_cli_run, fault_report):
    rows = [fault_report.injected(f"rae cache-latents: {kind} image among good ones") for kind in BAD_KINDS]
    images = image_folder(tmp_path / "images", per_class=3, classes=2)
    bad = {write_bad_image(images / "class1" / f"bad_{kind}.png", kind) for kind in BAD_KINDS}
    proc = rae_cli_run(["cache-latents", images, "--out", tmp_path / "cache", "-p", "tiny", "shard_size=4"])
    assert proc.returncode == 0, explain(proc)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["num_images"] == 6 and index["num_bad"] == len(BAD_KINDS)
    assert {b["path"] for b in index["bad_files"]} == {str(p) for p in bad}
    assert (tmp_path / "cache" / "stats.safetensors").is_file()
    for row in rows:
        row.survived = True


# ---------------------------------------------------------------------------------------------------------------
# A malicious pickle at every place a .pt is accepted (resume states: see test_train_faults.py)


def _places(evil, images, train_images, gen):
    """(description, rae arguments) for every option that accepts a .pt file."""
    return [
        ("sample checkpoint= (official stage-2 .pt)",
         ["sample", "-p", "tiny", "--out", "{out}", f"checkpoint={evil}", "dit=tiny", "num_images=1"]),
        ("sample guidance.guide_checkpoint= (AutoGuidance guide .pt)",
         ["sample", "-p", "tiny", "--out", "{out}", "dit_random_init=true", "guidance.method=autoguidance",
          "guidance.scale=1.5", f"guidance.guide_checkpoint={evil}", "guidance.guide_dit=tiny", "num_images=1"]),
        ("convert-dit checkpoint=", ["convert-dit", "--out", "{out}", f"checkpoint={evil}", "dit=tiny", "rae=tiny"]),
        ("convert-dit --guide guidance.guide_checkpoint=",
         ["convert-dit", "--guide", "--out", "{out}", f"guidance.guide_checkpoint={evil}", "guidance.guide_dit=tiny",
          "rae=tiny"]),
        ("recon rae.decoder_weights= (official decoder model.pt)",
         ["recon", images, "--out", "{out}", "-p", "tiny", f"rae.decoder_weights={evil}"]),
        ("encode rae.stats= (official stat.pt)",
         ["encode", images, "--out", "{out}", "-p", "tiny", f"rae.stats={evil}"]),
        ("train-decoder loss.lpips_weights= (VGG16 .pth)",
         ["train-decoder", train_images, "--out", "{out}", "-p", "tiny", f"loss.lpips_weights={evil}"]),
        ("train-decoder disc.weights= (DINO .pth)",
         ["train-decoder", train_images, "--out", "{out}", "-p", "tiny", "loss.lpips_random_init=true",
          "disc.random_init=false", f"disc.weights={evil}"]),
        ("eval-fid inception_weights= (.pth)",
         ["eval-fid", gen, gen, "--out", "{out}/fid.json", f"inception_weights={evil}", "device=cpu"]),
    ]


def test_a_malicious_pickle_is_refused_everywhere_a_pt_is_accepted(good, tmp_path, rae_cli_run, fault_report):
    marker = tmp_path / "MARKER-the-pickle-ran"
    evil = malicious_pt(tmp_path / "evil.pt", marker)
    failures = []
    train_images = image_folder(tmp_path / "train_images", per_class=3, classes=2)  # ≥ batch 4 + holdout 2
    for i, (what, args) in enumerate(_places(evil, good, train_images, good)):
        row = fault_report.injected(f"malicious pickle: {what}")
        out = tmp_path / f"out{i}"
        proc = rae_cli_run([str(a).replace("{out}", str(out)) for a in args])
        text = " ".join(proc.stderr.split())
        ok = (proc.returncode == 2 and "Traceback" not in proc.stderr and str(evil) in text
              and "refused" in text and "weights_only=False" not in text and not marker.exists())
        if not ok:
            failures.append(f"{what}: {explain(proc)}")
            continue
        row.survived = True
    assert not marker.exists(), "the pickle's code ran"
    assert not failures, "\n\n".join(failures)
