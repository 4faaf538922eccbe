#!/usr/bin/env bash
# One-step generation on the embedded quickstart (CPU): a MeanFlow model distilled from the quickstart's flow-matching
# DiT, sampled with 1 and 2 network evaluations, judged next to the 50-step Euler samples.
#
#   bash examples/one_step.sh [OUT_DIR]          (default: quickstart-out/, shared with examples/quickstart.sh)
#
# Needs the quickstart's flow-matching run: reused if OUT_DIR has one (OUT_DIR/metrics.json from quickstart.sh),
# else examples/quickstart.sh OUT_DIR runs first. Then (only public `rae` subcommands):
#   train-dit -p quickstart-meanflow teacher=OUT/dit → sample method=meanflow num_steps=2 and 1 → eval-digits
# Results in OUT_DIR/one-step/: side_by_side.png (rows = classes 0..9; 50-step Euler | 2-step | 1-step),
# metrics.json (class accuracy and Fréchet distance of each, the targets, network evaluations), timings.json.
# MEANFLOW_FROM_SCRATCH=1 trains without the teacher (random init, data velocity, CFG folded with the model's own
# predictions) instead, for the same number of steps. QUICKSTART_SCALE=ci: a few steps per stage (test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-quickstart-out}
SCALE=${QUICKSTART_SCALE:-full}
if [ "${RAE_SKIP_INSTALL:-0}" != "1" ]; then
  bash examples/install.sh
fi
# shellcheck disable=SC1091
[ -x .venv/bin/rae ] && . .venv/bin/activate

T_START=$EPOCHREALTIME
if [ ! -f "$OUT/metrics.json" ] || [ ! -d "$OUT/dit/checkpoints" ]; then
  RAE_SKIP_INSTALL=1 bash examples/quickstart.sh "$OUT"
fi
T_QS=$EPOCHREALTIME

MF=(); SMP=()
if [ "${MEANFLOW_FROM_SCRATCH:-0}" = "1" ]; then
  MF=(teacher=null meanflow.init=null meanflow.guidance_scale=2.0)  # same 660 steps as the distilled run
  RUN="$OUT/meanflow-scratch"; RES="$OUT/one-step-scratch"
else
  MF=(teacher="$OUT/dit")
  RUN="$OUT/meanflow"; RES="$OUT/one-step"
fi
if [ "$SCALE" = "ci" ]; then
  MF+=(epochs=1 global_batch_size=32 ckpt_every_epochs=1)
  SMP=(num_images=20 grid_images=20)
fi
mkdir -p "$RES"
TIMINGS="$RES/timings.tsv"
printf 'quickstart (reused or run)\t%s\t%s\n' "$T_START" "$T_QS" > "$TIMINGS"
stage() {  # stage NAME COMMAND...: run, time, and record
  local name=$1; shift
  local t0=$EPOCHREALTIME
  echo "== $name: $*"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$t0" "$EPOCHREALTIME" >> "$TIMINGS"
}

stage train-meanflow rae train-dit -p quickstart-meanflow --cache "$OUT/latents" --out "$RUN" \
                       rae="$OUT/decoder/export/rae.yaml" "${MF[@]}"
for n in 2 1; do
  stage "sample-${n}step" rae sample -p quickstart --out "$RES/samples-${n}step" checkpoint="$RUN" \
                            method=meanflow num_steps=$n guidance.method=none "${SMP[@]}"
  stage "evaluate-${n}step" rae eval-digits "$RES/samples-${n}step" --real "$OUT/data/test" \
                              --out "$RES/metrics-${n}step.json"
done

python - "$OUT" "$RES" "${MEANFLOW_FROM_SCRATCH:-0}" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw
from rae_cli.digits_eval import class_grid
from rae_cli.npz import load_images_array

out, res = Path(sys.argv[1]), Path(sys.argv[2])
runs = {"50-step Euler (quickstart)": (out / "samples", out / "metrics.json"),
        "2-step MeanFlow": (res / "samples-2step", res / "metrics-2step.json"),
        "1-step MeanFlow": (res / "samples-1step", res / "metrics-1step.json")}
panels, metrics = [], {}
for name, (folder, mpath) in runs.items():
    info = json.loads((folder / "sample_info.json").read_text())
    images, labels = load_images_array(folder / "samples.npz"), np.asarray(info["labels"])
    panels.append(class_grid(images, labels, 10, per_class=5))
    m = json.loads(mpath.read_text())
    nfe = info.get("network_evaluations_per_image") or {}
    metrics[name] = {"sample_class_accuracy": m["sample_class_accuracy"], "frechet_distance": m["frechet_distance"],
                     "network_evaluations_per_image": nfe.get("main"), "num_samples": m["num_samples"],
                     "sampling_images_per_second": info.get("images_per_second")}
ref = metrics["50-step Euler (quickstart)"]
for name in ("2-step MeanFlow", "1-step MeanFlow"):
    metrics[name]["frechet_distance_vs_50_step"] = metrics[name]["frechet_distance"] / ref["frechet_distance"]
one = metrics["1-step MeanFlow"]
targets = {"1-step class accuracy >= 0.95": one["sample_class_accuracy"] >= 0.95,
           "1-step Frechet distance <= 1.25 x 50-step": one["frechet_distance_vs_50_step"] <= 1.25}
# side by side, 3× nearest-neighbour, a white gap and a caption line per panel
gap, scale = 12, 3
h = max(p.shape[0] for p in panels)
row = np.full((h, sum(p.shape[1] for p in panels) + gap * (len(panels) - 1), 3), 255, np.uint8)
x = 0
for p in panels:
    row[:p.shape[0], x:x + p.shape[1]] = p
    x += p.shape[1] + gap
pic = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
canvas = Image.new("RGB", (pic.width, pic.height + 24), "white")
canvas.paste(pic, (0, 24))
draw, x = ImageDraw.Draw(canvas), 0
for name, p in zip(runs, panels):
    draw.text((x * scale + 4, 6), name, fill="black")
    x += p.shape[1] + gap
canvas.save(res / "side_by_side.png")

rows = [line.split("\t") for line in (res / "timings.tsv").read_text().splitlines() if line]
timings = {name: round(float(end) - float(start), 1) for name, start, end in rows}
timings["total"] = round(sum(timings.values()), 1)
(res / "timings.json").write_text(json.dumps(timings, indent=2))
summary = {"results": metrics, "targets_met": targets,
           "frechet_distance_features": "efficientnet-lite0-imagenet (offline; not FID)",
           "teacher": None if sys.argv[3] == "1" else str(out / "dit"), "timings_s": timings}
(res / "metrics.json").write_text(json.dumps(summary, indent=2))
print(f"\none-step done → {res}/  (total {timings['total']} s, {timings.get('train-meanflow')} s MeanFlow training)")
for name, m in metrics.items():
    print(f"  {name:22s} NFE {m['network_evaluations_per_image']!s:>5}  class accuracy {m['sample_class_accuracy']:.3f}"
          f"  Fréchet distance {m['frechet_distance']:.1f}")
for k, ok in targets.items():
    print(f"  target {k}: {'met' if ok else 'MISSED'}")
EOF
