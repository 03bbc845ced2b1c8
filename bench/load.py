"""Time and peak memory to load a GPT-2-small-sized checkpoint: glassformer vs transformers.

Writes the checkpoint once (random weights) in both formats, then loads it in fresh processes, so
every measurement starts cold in Python (the OS page cache is warm for all of them alike) and peak
RSS is the process's own. Reports medians over `--repeats` processes.

    .venv/bin/python bench/load.py [--repeats 5] [--dir /tmp/glassformer-load-bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs in a child process: import, reset the peak RSS and note the baseline, load, note time and
# peak, then run one forward (which pages in every weight of a memory-mapped load) and note the
# peak again. Peaks are VmHWM above the pre-load RSS (page-cache pages mapped in count, as they should).
CHILD = """
import json, sys, time
import torch
torch.set_num_threads(2)
import transformers, glassformer as gf
def rss_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
kind, path = sys.argv[1], sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss_mib("VmRSS:")
start = time.perf_counter()
if kind == "glassformer":
    model = gf.Transformer.load(path)
elif kind == "glassformer-from-hf":
    model = gf.Transformer.from_hf(path)
else:
    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
loaded = time.perf_counter() - start
load_peak = rss_mib("VmHWM:") - base
with torch.no_grad():
    out = model(torch.zeros(1, 8, dtype=torch.long))
first_forward = time.perf_counter() - start
print(json.dumps({"load_s": loaded, "load_plus_forward_s": first_forward, "load_peak_mib": load_peak,
                  "peak_after_forward_mib": rss_mib("VmHWM:") - base}))
"""


def write_checkpoints(root: Path) -> tuple[Path, Path]:
    """GPT-2 small with random weights, as a Hugging Face directory and as a glassformer one."""
    import torch
    import transformers

    import glassformer as gf

    hf_dir, gf_dir = root / "hf", root / "gf"
    if not (hf_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(hf_dir)
    if not (gf_dir / "model.safetensors").exists():
        gf.Transformer.from_hf(hf_dir).save(gf_dir)
    return hf_dir, gf_dir


def measure(kind: str, path: Path, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "glassformer-load-bench")
    args = parser.parse_args()
    hf_dir, gf_dir = write_checkpoints(args.dir)
    weights_mib = (gf_dir / "model.safetensors").stat().st_size / 2**20
    rows = {
        "glassformer Transformer.load": measure("glassformer", gf_dir, args.repeats),
        "glassformer from_hf (HF dir)": measure("glassformer-from-hf", hf_dir, args.repeats),
        "transformers from_pretrained": measure("transformers", hf_dir, args.repeats),
    }
    print(f"GPT-2 small checkpoint, {weights_mib:.0f} MiB of float32 weights; medians of {args.repeats} processes\n")
    print(
        f"{'':32} {'load s':>8} {'load+fwd s':>11} {'peak MiB (load)':>16} {'peak MiB (+fwd)':>16} {'peak/weights':>13}"
    )
    for name, r in rows.items():
        ratio = r["peak_after_forward_mib"] / weights_mib
        print(
            f"{name:32} {r['load_s']:8.3f} {r['load_plus_forward_s']:11.3f} {r['load_peak_mib']:16.0f} "
            f"{r['peak_after_forward_mib']:16.0f} {ratio:13.2f}"
        )
    ours, theirs = rows["glassformer Transformer.load"], rows["transformers from_pretrained"]
    ratio = ours["load_plus_forward_s"] / theirs["load_plus_forward_s"]
    print(f"\nload time ratio glassformer/transformers: {ratio:.2f} (load + first forward; target <= 1.0)")
    print(f"peak memory / weights: {ours['peak_after_forward_mib'] / weights_mib:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
