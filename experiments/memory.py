"""
Peak resident memory where users feel it, each in a fresh process and cache, beside the floor of
a Python that imported torch alone:

  demo       `python train.py` for 100 steps, L_NSP from the first, two evaluations
  text_3mb   preparing and training on a 3 MB .txt: 20 steps, one evaluation
  text_run   a whole default run on a 3 MB .txt (or --text), every evaluation: about 20 minutes
  text_50mb  preparing a 50 MB .txt (load_data alone)

The texts are pydoc's topics repeated, every sentence numbered (a repeated sentence would be one
datastore entry, its val copies caught as leaks).

    python -m experiments.memory --parts demo,text_3mb
    python -m experiments.memory --parts text_run --text sherlock.txt
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from experiments.band import ROOT, chosen
from machinery.cli import UserError, flag, main_guard, parse_config

PARTS = ("demo", "text_3mb", "text_run", "text_50mb")
# Runs `python script args...`, then prints its peak resident set in KB as stderr's last line,
# however it exits: Linux's VmHWM (ru_maxrss would count the parent's pages held before exec).
CHILD = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
         "    print('peak_kb', kb, file=sys.stderr)\n"
         "atexit.register(peak)\n"
         "sys.argv = sys.argv[1:]\n"
         "sys.path.insert(0, {root!r})\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")
PREPARE = ("import sys\nfrom data import load_data\nfrom machinery.config import Config\n"
           "load_data(Config(dataset=sys.argv[1], cache_dir=sys.argv[2]))\n")


@dataclass
class MemoryConfig:
    parts: str = flag("all", "the measurements to run, comma-separated: " + ", ".join(PARTS))
    text: str = flag("", "text_run's .txt (default: a 3 MB numbered text, as text_3mb's)")


def peak_mb(script, *args):
    """Peak resident memory (MB) and wall time (s) of `python script args` in a fresh process."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), script, *args],
                         capture_output=True, text=True, cwd=ROOT)
    last = (run.stderr.strip().splitlines() or [""])[-1]
    if run.returncode or not last.startswith("peak_kb"):
        raise UserError(f"{os.path.basename(script)} {' '.join(args)} failed: {last}")
    return int(last.split()[1]) / 1024, time.perf_counter() - t0


def numbered_text(path, size):
    """A text of at least `size` bytes: pydoc's topics again and again, each sentence numbered."""
    import pydoc_data.topics as topics
    source = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    count, parts, written = itertools.count(), [], 0
    while written < size:
        part = re.sub(r"([.!?])(\s)", lambda m: f" (s{next(count)}){m.group(1)}{m.group(2)}",
                      source)
        parts.append(part)
        written += len(part.encode())
    return write(path, "".join(parts))


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def main(argv=None):
    cfg, _ = parse_config(MemoryConfig, __doc__, argv)
    parts = chosen(cfg.parts, PARTS)
    if cfg.text and not os.path.isfile(cfg.text):
        raise UserError(f"--text: no such file: {cfg.text}")
    with tempfile.TemporaryDirectory() as tmp:
        def text(mb):
            return numbered_text(f"{tmp}/{mb}mb.txt", mb * 1e6)

        def train(name, *flags):  # a fresh run and cache each
            return peak_mb(os.path.join(ROOT, "train.py"), *flags, "--out_dir", f"{tmp}/{name}",
                           "--cache_dir", f"{tmp}/{name}_cache")
        short = ["--nsp_start", "0", "--max_iters"]  # L_NSP from the first of so few steps
        runs = {"demo": lambda: train("demo", *short, "100", "--eval_interval", "100"),
                "text_3mb": lambda: train("text_3mb", "--dataset", text(3), *short, "20",
                                          "--eval_interval", "20"),
                "text_run": lambda: train("text_run", "--dataset", os.path.abspath(cfg.text)
                                          if cfg.text else text(3)),
                "text_50mb": lambda: peak_mb(write(f"{tmp}/prepare.py", PREPARE), text(50),
                                             f"{tmp}/prepare_cache")}
        floor, _ = peak_mb(write(f"{tmp}/floor.py", "import torch\n"))
        result = {"torch_import_floor_mb": floor}
        for name in parts:
            mb, seconds = runs[name]()
            result[name] = {"peak_mb": mb, "seconds": seconds, "over_floor_mb": mb - floor}
            print(f"{name}: peak {mb:.0f} MB ({mb - floor:.0f} over the floor)", file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main_guard(main)
