#!/usr/bin/env python3
"""Compile zgrid's protocol and simulator modules with mypyc, into a tree of their own.

    .venv/bin/python scripts/mypyc_build.py build/mypyc
    PYTHONPATH=build/mypyc zgrid-sim --scenario examples/scenarios/village.toml ...

What it is for: long simulator runs (`make bench-sim` runs the 1,000-node day with it). mypyc
compiles the modules as they are, from the same type annotations `mypy --strict` already
checks, into C extensions; a compiled module makes the same decisions as the interpreted one,
only with less interpreter overhead per advert (`scripts/bench_day.py --compiled` runs the day
both ways and checks that every figure of the two days is identical).

What it must never do: write into the checkout's own `zgrid/`. The compiled modules live in a
copy of the package under the output directory, so they cannot go stale beside sources that
are being edited; `make` rebuilds the copy when a source changes, and the copy records the
hash of the sources it was built from (`SOURCE_HASH`).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "zgrid"

# Where a simulated grid spends its time (docs/scaling.md). Not compiled: devices.py (mypyc's
# dataclasses do not take its base class with defaulted fields) and everything that does I/O.
COMPILED = (
    "zgrid/wire.py",
    "zgrid/errors.py",
    "zgrid/persisted.py",
    "zgrid/table.py",
    "zgrid/flood.py",
    "zgrid/clearing.py",
    "zgrid/core.py",
    "zgrid/sim/network.py",
    "zgrid/sim/engine.py",
    "zgrid/sim/measurement.py",
)

def source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build(out: Path) -> None:
    out = out.resolve()
    if out == ROOT or ROOT.is_relative_to(out):
        raise SystemExit(f"error: {out} would hold the checkout itself; pick another directory")
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(PACKAGE, out / "zgrid",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    # mypyc builds with setuptools in the current directory: the copy's, where no
    # pyproject.toml is (the project's own is for hatchling, not for this build); it checks
    # types with the project's own mypy settings, the ones `make lint` uses.
    command = [sys.executable, "-m", "mypyc", "--config-file", str(ROOT / "pyproject.toml"),
               *COMPILED]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"error: mypyc failed (exit {done.returncode}); see above")
    missing = [m for m in COMPILED
               if not list((out / m).parent.glob(Path(m).stem + ".*.so"))]
    if missing:
        raise SystemExit(f"error: mypyc built no extension for {', '.join(missing)}")
    shutil.rmtree(out / "build", ignore_errors=True)  # the C sources and objects
    (out / "SOURCE_HASH").write_text(source_hash() + "\n")
    print(f"compiled {len(COMPILED)} modules into {out} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the directory to build the compiled copy in")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
