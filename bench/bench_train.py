"""The README's default run, measured: ``python train.py`` as a new user runs it.

Runs ``python train.py`` (plus any Hydra overrides given on this command line)
in a child process under ``/usr/bin/time -v`` in a fresh run directory, then
writes its final rate-distortion table (read from the run's ``rd_table.json``),
the wall time and the peak memory to ``docs/benchmarks/train.md`` and the
README's ``<!-- bench:train -->`` block, and copies the run's RD plot and layer
strip to ``docs/images/``.

    python bench/bench_train.py                      # the default run
    python bench/bench_train.py trainer.max_epochs=2 # a shorter one (not for the README)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, write_report

from svq_modules.lightning.table import format_rd_table


def run_default(overrides: list[str], run_dir: Path) -> tuple[dict, float, float, float]:
    """``(rd entry, wall s, user+sys CPU s, peak RSS MiB)`` of ``python train.py``."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"train.py failed with exit status {proc.returncode}")

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", proc.stderr).group(1).strip()

    h, m, s = (["0"] + field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"))[-3:]
    wall = int(h) * 3600 + int(m) * 60 + float(s)
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    rss = int(field("Maximum resident set size (kbytes)")) / 1024
    return json.loads((run_dir / "rd_table.json").read_text()), wall, cpu, rss


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        entry, wall, cpu, rss = run_default(overrides, run_dir)
        rows = [dict(r) for r in entry["rows"]]
        rows[-1]["layer"] = f"{rows[-1]['layer']} (exact codeword)"
        command = "python train.py" + (" " + " ".join(overrides) if overrides else "")
        table = format_rd_table(rows, flat=entry.get("flat"), markdown=True)
        body = (
            f"`{command}`: wall time **{wall:.1f} s** ({cpu:.1f} s CPU user+sys), peak RSS {rss:.0f} MiB; "
            f"final rate-distortion on the {entry['num_vectors']} held-out latent vectors "
            f"(step {entry['step']}; `flat` = the same codebook as a flat VQ):\n\n{table}\n"
        )
        print(body)
        if not overrides:
            for png in ("rd_curve.png", "rd_layers.png"):
                if (run_dir / png).is_file():
                    shutil.copy(run_dir / png, REPO_ROOT / "docs" / "images" / png)
            path = write_report("train", "The default training run", body)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
