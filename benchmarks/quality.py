"""Quality of every family's main job, in the settings where each paper's claim can show.

Runs the jobs below (each a ``lightning-losses`` subcommand, offline on the embedded data), then gathers their
tables, with the exact command that produced each, into ``benchmarks/results/quality.md``. The README's quality
tables are taken from that file.

    python benchmarks/quality.py                 # every job in its default setting (about 40 min on 2 cores)
    python benchmarks/quality.py --quick         # every job's --quick setting (a few minutes): a smoke run
    python benchmarks/quality.py --only distill  # one job
    python benchmarks/quality.py --collect       # rebuild quality.md from the tables already written

The settings, and why each was chosen, are in the jobs' own tables (their first paragraph) and the README.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _harness import machine_description, write_result

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "quality"

# job name -> (arguments of the default setting, arguments of the quick setting, tables it writes)
JOBS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "distill": ([], ["--quick"], ["distill{suffix}.md"]),
    "calibrate": ([], ["--quick"], ["calibrate{suffix}.md"]),
    "temperature": ([], ["--quick"], ["lm.md", "mnist.md", "mnist_lambda.md"]),
    "unlearn": ([], ["--quick"], ["unlearn{suffix}.md"]),
}


def _command(job: str, quick: bool) -> list[str]:
    default, quick_args, _ = JOBS[job]
    return ["lightning-losses", job, *(quick_args if quick else default), "--output", str(OUTPUT / job)]


def _tables(job: str, quick: bool) -> list[Path]:
    suffix = {"unlearn": "-quick"}.get(job, "_quick") if quick else ""
    return [OUTPUT / job / name.format(suffix=suffix) for name in JOBS[job][2]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every job's --quick setting")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(JOBS)}")
    parser.add_argument("--collect", action="store_true", help="only gather the tables already written")
    args = parser.parse_args(argv)
    jobs = args.only.split(",") if args.only else list(JOBS)
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        raise SystemExit(f"Unknown jobs {unknown}: choose from {','.join(JOBS)}.")
    seconds: dict[str, float] = {}
    for job in [] if args.collect else jobs:
        command = _command(job, args.quick)
        print(f"$ {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        executable = Path(sys.executable).with_name("lightning-losses")
        subprocess.run([str(executable), *command[1:]], check=True, cwd=ROOT)
        seconds[job] = time.perf_counter() - start
    sections = [f"# Quality of the main jobs\n\n{machine_description()}\n"]
    for job in JOBS:
        tables = [path for path in _tables(job, args.quick) if path.exists()]
        if not tables:
            continue
        took = f" ({seconds[job] / 60:.1f} min)" if job in seconds else ""
        sections.append(f"## `{shlex.join(_command(job, args.quick)).replace(str(ROOT) + '/', '')}`{took}\n")
        for path in tables:
            text = path.read_text().strip()
            sections.append(text.replace("# ", "### ", 1) + "\n")
    path = write_result("quality" + ("_quick" if args.quick else ""), "\n".join(sections))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
