"""Image classification: distinfer vs one process vs Ray Data, 2,000 JPEGs, efficientnet-lite0.

The photographs: the real ones bundled in examples/images/ and those scikit-image ships,
cut and scaled into 2,000 JPEGs (random crops, longest side 320, 640, 1024 or 1600 px,
quality 90), as phone or web photos come: larger than the model's 224 x 224.

Contenders, each in a fresh process, one after another, in one run:
  P  one process, all cores: distinfer's own decoding and model (`ImageRunner` around the
     efficientnet-lite0 runner, torch on 2 threads) in a plain loop over the listing
  P+ P with the glibc malloc settings distinfer's workers run with (worker/process.py:
     MALLOC_ENV; without them most of the model's time goes to mapping fresh pages)
  W  one worker (1 thread): the same loop on 1 thread over the first half of the images (a
     worker's share), with the workers' malloc settings: the per-worker throughput of the
     ideal `2 x W`
  W2 two copies of W at once: what this machine gives two independent single-thread
     processes (shared caches and memory bandwidth), the ideal's reachable part
  D  `distinfer run --model efficientnet-lite0 --input DIR --workers 2` (1 thread each)
  Dx the same with --jpeg-draft off (every pixel decoded), to show what draft mode saves
  R  Ray Data: `read_images(DIR, mode="RGB")` + `map_batches(Classifier, concurrency=2,
     num_cpus=0.5, batch_size=64)` (an actor pool of the same size; with num_cpus=1 the
     actors hold both CPUs and the read tasks never run) + `write_parquet`; the
     classifier resizes, crops and normalises as distinfer does and runs distinfer's same
     efficientnet-lite0 runner, so only the engines differ
  R+ R with the workers' malloc settings in every Ray worker (`runtime_env` env_vars), to
     tell the engines apart from the allocator
Targets: D >= 1.5 x R over the whole command, and D's throughput once started
>= 0.95 x 2 x W. Also reported: the share of D's worker time spent decoding and
preprocessing (the report's "preprocess"), and P's decode time per image with and
without draft mode.

    python benchmarks/images.py [--images 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SIZES = (320, 640, 1024, 1600)

ONE_PROCESS = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from distinfer.models.families import load_runner, parse_model
from distinfer.models.images import ImageRunner, decode_image
from distinfer.models.base import StageTimer, run_block
paths, threads = open(sys.argv[1]).read().splitlines()[: int(sys.argv[2])], int(sys.argv[3])
spec = parse_model("efficientnet-lite0")
runner = ImageRunner(load_runner(spec, threads), spec.family.image_defaults(spec))
run_block(runner, {"image": paths[:8]}, 64, StageTimer())  # first-call costs
start = time.perf_counter()
timer = StageTimer()
for i in range(0, len(paths), 256):
    run_block(runner, {"image": paths[i:i + 256]}, 64, timer)
steady = len(paths) / (time.perf_counter() - start)
out = {"steady": steady, "command_s": time.perf_counter() - t0, "seconds": timer.seconds}
if len(sys.argv) > 4:  # decode time per image, draft on and off
    from dataclasses import replace
    options = runner.options["image"]
    for draft in (True, False):
        o = replace(options, draft=draft)
        t = time.perf_counter()
        for p in paths[:200]:
            decode_image(p, o)
        out[f"decode_ms_draft_{draft}"] = (time.perf_counter() - t) / 200 * 1e3
print(json.dumps(out))
"""

RAY_DATA = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import ray

class Classifier:
    def __init__(self):
        from PIL import Image
        from distinfer.models.families import load_runner, parse_model
        from distinfer.models.images import normalise
        global run_block, StageTimer
        from distinfer.models.base import StageTimer, run_block
        spec = parse_model("efficientnet-lite0")
        self.runner = load_runner(spec, 1)
        self.options = spec.family.image_defaults(spec).resolved(None)
        self.Image, self.normalise = Image, normalise

    def prep(self, pixels):
        o = self.options
        image = self.Image.fromarray(pixels)
        scale = o.resize / min(image.size)
        w, h = round(image.size[0] * scale), round(image.size[1] * scale)
        image = image.resize((w, h), self.Image.BILINEAR)
        left, top = (w - o.size[1]) // 2, (h - o.size[0]) // 2
        return np.asarray(image.crop((left, top, left + o.size[1], top + o.size[0])))

    def __call__(self, batch):
        start = time.time()
        pixels = np.stack([self.prep(p) for p in batch["image"]])
        out = run_block(self.runner, {"image": self.normalise(pixels, self.options)}, 64, StageTimer())
        n = len(pixels)
        return {"top5_ids": out["top5_ids"], "start": np.full(n, start), "end": np.full(n, time.time())}

env = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
t_init = time.perf_counter() - t0
t1 = time.time()
ds = ray.data.read_images(sys.argv[1], mode="RGB")
# num_cpus=0.5: with 1 CPU each the two actors would hold both CPUs Ray was given, and
# read_images' decoding tasks would never be scheduled (the job hangs)
ds = ds.map_batches(Classifier, concurrency=2, num_cpus=0.5, batch_size=64)
ds.write_parquet(sys.argv[2])
t_end = time.time()
done = ray.data.read_parquet(sys.argv[2])
stats = done.select_columns(["start", "end"]).to_pandas()
rows = len(stats)
first, last = float(stats["start"].min()), float(stats["end"].max())
print(json.dumps({"rows": rows, "init_s": t_init, "steady": rows / (last - first),
                  "command_s": time.perf_counter() - t0}))
"""


def photographs() -> list[np.ndarray]:
    """The bundled photographs and scikit-image's, as RGB arrays."""
    from PIL import Image

    bundled = sorted((REPO / "examples" / "images").glob("*.jpg"))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in bundled]
    try:
        import skimage.data as sk

        for name in ("astronaut", "chelsea", "coffee", "rocket", "cat"):
            if hasattr(sk, name):
                image = getattr(sk, name)()
                if image.ndim == 3:
                    photos.append(image[..., :3])
    except ImportError:
        pass
    if not photos:
        raise SystemExit("no photographs: examples/images/ is empty and scikit-image is missing")
    return photos


def make_jpegs(folder: Path, count: int) -> None:
    from PIL import Image

    photos = photographs()
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(photo[top : top + ch, left : left + cw])
        longest = SIZES[i % len(SIZES)]
        scale = longest / max(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.BICUBIC)
        image.save(folder / f"photo-{i:05d}.jpg", quality=90)


def worker_env() -> dict[str, str]:
    """The environment a distinfer worker process runs with (glibc malloc settings)."""
    from distinfer.worker.process import worker_environment

    return {**os.environ, **worker_environment()}


def run_json(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=1800,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  ({json.dumps(result)})", flush=True)
    return result


def run_two(code: str, *args: str) -> float:
    """Two copies of a one-process run at once: the sum of their rates, what this machine gives
    two independent processes (shared caches, memory bandwidth, clocks)."""
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                              env=worker_env()) for _ in range(2)]
    rates = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1])["steady"] for p in procs]
    print(f"  (two at once: {rates})", flush=True)
    return float(sum(rates))


def run_distinfer(folder: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "distinfer.cli", "run", "--model", "efficientnet-lite0",
           "--input", str(folder), "--output", str(out), "--strategy", "data", "--workers", "2",
           "--threads-per-worker", "1",
           "--batch-size", "64", "--overwrite", "--no-progress", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"distinfer failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "_report.json").read_text())
    summary = [line for line in proc.stderr.splitlines() if " rows in " in line]
    print(f"  ({summary[0] if summary else 'no summary'})", flush=True)
    workers = report["worker_stats"]
    busy = sum(sum(v for k, v in w["seconds"].items() if k != "idle") for w in workers)
    pre = sum(w["seconds"].get("preprocess", 0.0) for w in workers)
    return {"steady": report["steady_throughput"], "startup_s": report["startup_s"], "command_s": wall,
            "rows": report["rows"], "preprocess_share": pre / busy if busy else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        make_jpegs(folder, n)
        listing = Path(tmp) / "listing.txt"
        listing.write_text("\n".join(str(p) for p in sorted(folder.glob("*.jpg"))) + "\n")
        mb = sum(p.stat().st_size for p in folder.glob("*.jpg")) / 1e6
        p = run_json(ONE_PROCESS, str(listing), str(n), "2", "decode")
        pw = run_json(ONE_PROCESS, str(listing), str(n), "2", env=worker_env())
        share = str(max(1, n // 2))  # one worker's share of the job
        w = run_json(ONE_PROCESS, str(listing), share, "1", env=worker_env())
        w2 = run_two(ONE_PROCESS, str(listing), share, "1")
        d = run_distinfer(folder, Path(tmp) / "d")
        dx = run_distinfer(folder, Path(tmp) / "dx", "--jpeg-draft", "off")
        r = run_json(RAY_DATA, str(folder), str(Path(tmp) / "ray"))
        from distinfer.worker.process import worker_environment

        rw = run_json(RAY_DATA, str(folder), str(Path(tmp) / "ray2"), json.dumps(worker_environment()))
    print(f"{n} JPEGs ({mb:.0f} MB; longest side {', '.join(map(str, SIZES))} px), efficientnet-lite0, "
          "2 cores")
    print(f"P one process, 2 threads        : {p['steady']:6.1f} images/s (model loaded); whole command "
          f"{p['command_s']:.1f} s")
    print(f"P+ the same, workers' malloc    : {pw['steady']:6.1f} images/s (model loaded); whole command "
          f"{pw['command_s']:.1f} s")
    print(f"W one worker, 1 thread          : {w['steady']:6.1f} images/s "
          f"(ideal for 2: {2 * w['steady']:.1f})")
    print(f"W2 two such processes at once   : {w2:6.1f} images/s together "
          f"({w2 / (2 * w['steady']):.2f} of 2 x W: what this machine gives two independent processes)")
    print(f"D distinfer, 2 workers x 1      : {d['steady']:6.1f} images/s once started; start-up "
          f"{d['startup_s']:.1f} s; whole command {d['command_s']:.1f} s ({n / d['command_s']:.1f} images/s)")
    print(f"Dx distinfer, --jpeg-draft off  : {dx['steady']:6.1f} images/s once started; whole command "
          f"{dx['command_s']:.1f} s")
    print(f"R Ray Data, actor pool of 2     : {r['steady']:6.1f} images/s once started; ray.init "
          f"{r['init_s']:.1f} s; whole command {r['command_s']:.1f} s ({n / r['command_s']:.1f} images/s)")
    print(f"R+ Ray Data, workers' malloc    : {rw['steady']:6.1f} images/s once started; whole command "
          f"{rw['command_s']:.1f} s ({n / rw['command_s']:.1f} images/s)")
    print(f"  decoding + preprocessing: {d['preprocess_share']:.0%} of D's worker time "
          f"({dx['preprocess_share']:.0%} with draft off); "
          f"decode per image {p['decode_ms_draft_True']:.1f} ms "
          f"with draft, {p['decode_ms_draft_False']:.1f} ms without")
    over_ray = r["command_s"] / d["command_s"]
    scaling = d["steady"] / (2 * w["steady"])
    ok_ray, ok_scaling = over_ray >= 1.5, scaling >= 0.95
    print(f"  D / R over the whole command >= 1.5: {over_ray:.2f}  {'met' if ok_ray else 'MISSED'}")
    print(f"  D once started / (2 x W) >= 0.95: {scaling:.2f}  {'met' if ok_scaling else 'MISSED'}")
    print(f"  D / R+ over the whole command: {rw['command_s'] / d['command_s']:.2f}")
    print(f"  D once started / W2: {d['steady'] / w2:.2f}")
    print(f"  D / P (once started): {d['steady'] / p['steady']:.2f}")
    return 0 if ok_ray and ok_scaling else 1


if __name__ == "__main__":
    sys.exit(main())
