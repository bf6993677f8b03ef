"""Peak memory of each stage of ``hrpqct run`` on a full-size scan (issue #16: <= 3 GB).

Usage: python benchmarks/bench_run_memory.py [--data /work/memdata] [--slices 168]
       [--slice-step 1] [--jobs 2] [--out DIR] [--only-read]

The scan is the bundled example (the synthetic phantom ``hrpqct demo`` makes, written as a
Scanco AIM the same way); it is made once under ``--data`` (``example_scan_<slices>.AIM``) and
reused. The run is :func:`HRpQCTPipeline.pipeline.run_scan` with the settings ``hrpqct run``
uses by default (bundled model and classifier, radiomics of every ``--slice-step``-th slice),
in this process, so that each stage's peak resident memory can be measured: before each stage
the process's high-water mark is reset (Linux ``/proc/self/clear_refs``) and read back after
it. The stages are the functions the pipeline calls: reading the scan (``read_scan``), the
plausibility check (``require_plausible_scan``), the network (``run_segmentation``),
post-processing (``postprocess``, and inside it the clean-up, the surface refinement and the
soft-tissue subdivision), writing the region maps
(``write_label_map``, both files), the radiomics stage (features and their CSV; its worker
processes are measured separately, each one's own high-water mark), the classification
stage (with the regions' QC statistics it computes first, reused by the report) and the QC
report. "between stages" is the largest peak outside these functions (loading the model, the
network's window). The run's peak is the largest of them all. Memory is in GiB
(2**30 bytes), as ``/usr/bin/time -v`` kB / 2**20, the unit of ``benchmarks/RESULTS.md``.

``--only-read`` measures reading the scan alone (quick). ``--out`` keeps the run's outputs there
(to compare them byte for byte between two versions of the code); by default a temporary
folder is used and removed. Run another version of the code with ``PYTHONPATH`` pointing at its
``HRpQCTSegmenter`` and ``HRpQCTRadiomics`` folders. All data are synthetic phantoms.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_s as _cpu_s
from _common import machine
from _common import status_gib as _status_gb


def _reset_peak() -> None:
    """Reset this process's resident-memory high-water mark (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def _descendants(pid: int) -> list[int]:
    """Process ids of every living descendant of ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


class StageMeter:
    """Peak RSS (reset high-water mark) and wall time of named stages of this process.

    Stages may nest (the steps of post-processing inside it): a step's peak counts for the
    stage around it too.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float, float]] = []  # name, wall s, CPU s,
        # RSS before and peak RSS (GiB)
        self.between_gb = 0.0
        self.workers: list[float] = []
        self._open: list[list[float]] = []  # per running stage: its peak so far (GiB)
        _reset_peak()

    def _note_peak(self, peak_gb: float) -> None:
        """The high-water mark until now belongs to the stage running, or to none."""
        if self._open:
            self._open[-1][0] = max(self._open[-1][0], peak_gb)
        else:
            self.between_gb = max(self.between_gb, peak_gb)

    def wrap(self, name: str, fn, *, workers: bool = False):
        """``fn`` measured as stage ``name`` each time it is called."""
        @functools.wraps(fn)
        def measured(*args, **kwargs):
            self._note_peak(_status_gb("VmHWM"))
            _reset_peak()
            self._open.append([0.0])
            row = len(self.rows)  # rows in the order the stages start
            self.rows.append((name, 0.0, 0.0, 0.0, 0.0))
            before = _status_gb("VmRSS")
            start, cpu = time.perf_counter(), _cpu_s()
            try:
                return fn(*args, **kwargs)
            finally:
                peak = max(self._open.pop()[0], _status_gb("VmHWM"))
                self.rows[row] = (name, time.perf_counter() - start, _cpu_s() - cpu, before,
                                  peak)
                if workers:  # loky keeps its workers alive for a while: read their peaks
                    self.workers += [_status_gb("VmHWM", str(p))
                                     for p in _descendants(os.getpid())]
                if self._open:  # a step's peak is its stage's too
                    self._open[-1][0] = max(self._open[-1][0], peak)
                _reset_peak()
        return measured

    def finish(self) -> None:
        """Account for the memory used after the last stage."""
        self.between_gb = max(self.between_gb, _status_gb("VmHWM"))


def make_scan(data: Path, n_slices: int) -> Path:
    """The bundled example with ``n_slices`` slices as an AIM under ``data`` (made once)."""
    from HRpQCTCore import io
    from HRpQCTPhantom import generate_phantom
    from HRpQCTPhantom.example import EXAMPLE_SEED, example_params

    path = data / f"example_scan_{n_slices}.AIM"
    if not path.is_file():
        data.mkdir(parents=True, exist_ok=True)
        phantom = generate_phantom(example_params(n_slices), seed=EXAMPLE_SEED)
        partial = path.with_name(path.name + ".part")
        io.write_scan_aim(phantom.scan, partial)  # as `hrpqct demo` writes it
        partial.replace(path)
        print(f"made {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


def instrument(meter: StageMeter) -> None:
    """Wrap the functions the pipeline calls for each stage (looked up at call time)."""
    import HRpQCTCore.io as core_io
    import HRpQCTPipeline.pipeline as pipeline
    import HRpQCTPipeline.qc as qc
    import HRpQCTSegmentationEngine.inference as inference
    import HRpQCTSegmentationEngine.plausibility as plausibility
    import HRpQCTSegmentationEngine.postprocess as postprocess

    core_io.read_scan = meter.wrap("read scan", core_io.read_scan)
    plausibility.require_plausible_scan = meter.wrap("plausibility check",
                                                     plausibility.require_plausible_scan)
    inference.run_segmentation = meter.wrap("segmentation (network)",
                                            inference.run_segmentation)
    postprocess.postprocess = meter.wrap("post-processing", postprocess.postprocess)
    for step, name in (("clean_classes", "- clean-up"), ("refine_surfaces", "- surfaces"),
                       ("subdivide_soft_tissue", "- soft tissue")):
        setattr(postprocess, step, meter.wrap(name, getattr(postprocess, step)))
    core_io.write_label_map = meter.wrap("write regions", core_io.write_label_map)
    # the radiomics stage as the pipeline lists it: wrapping its extraction function would
    # import the radiomics engine (~0.1 GiB) before the scan is read, which the run does not
    wrapped = {"radiomics": meter.wrap("radiomics (parent)", dict(pipeline._STAGE_STEPS)[
        "radiomics"], workers=True)}
    wrapped["classification"] = meter.wrap("classification", dict(pipeline._STAGE_STEPS)[
        "classification"])
    pipeline._STAGE_STEPS = tuple((stage, wrapped.get(stage, step))
                                  for stage, step in pipeline._STAGE_STEPS)
    # the regions' QC (computed once, in the classification stage, reused by the report)
    for step, name in (("region_stats", "- QC region statistics"),
                       ("motion_index", "- QC motion index")):
        setattr(qc, step, meter.wrap(name, getattr(qc, step)))
    pipeline._report = meter.wrap("QC report", pipeline._report)


def _print(meter: StageMeter, args, scan: Path, seconds: float) -> None:
    print(machine())
    print(f"load average {os.getloadavg()[0]:.2f} at the end; {time.strftime('%Y-%m-%d %H:%M')}"
          f" UTC{time.strftime('%z')}; scan {scan.name} ({scan.stat().st_size / 1e6:.0f} MB); "
          f"slice step {args.slice_step}, {args.jobs} radiomics worker(s); run {seconds:.1f} s")
    print(f"{'stage':<26} {'calls':>5} {'wall s':>8} {'CPU s':>8} {'RSS before GiB':>15} "
          f"{'peak RSS GiB':>12}")
    names = list(dict.fromkeys(r[0] for r in meter.rows))
    for name in names:
        rows = [r for r in meter.rows if r[0] == name]
        print(f"{name:<26} {len(rows):5d} {sum(r[1] for r in rows):8.1f} "
              f"{sum(r[2] for r in rows):8.1f} {rows[0][3]:15.2f} {max(r[4] for r in rows):12.2f}")
    blank = ""
    print(f"{'between stages':<26} {blank:>5} {blank:>8} {blank:>8} {blank:>15} "
          f"{meter.between_gb:12.2f}")
    if meter.workers:
        print(f"{'radiomics workers (each)':<26} {len(meter.workers):5d} {blank:>8} {blank:>8} "
              f"{blank:>15} {max(meter.workers):12.2f}")
    peak = max([meter.between_gb] + [r[4] for r in meter.rows])
    print(f"{'run (parent process)':<26} {blank:>5} {seconds:8.1f} {_cpu_s():8.1f} {blank:>15} "
          f"{peak:12.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/memdata", help="folder of the test scans")
    parser.add_argument("--slices", type=int, default=168)
    parser.add_argument("--slice-step", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="radiomics worker processes")
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--only-read", action="store_true", help="measure read_scan alone")
    args = parser.parse_args()
    scan = make_scan(Path(args.data), args.slices)
    meter = StageMeter()
    instrument(meter)
    start = time.perf_counter()
    if args.only_read:
        import HRpQCTCore.io as core_io

        core_io.read_scan(scan)
    else:
        from HRpQCTPipeline.pipeline import RunSettings, ScanJob, run_scan

        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_run_memory_"))
        try:
            run_scan(ScanJob.from_path(scan), out,
                     RunSettings(slice_step=args.slice_step, jobs=args.jobs), overwrite=True)
        finally:
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
    meter.finish()
    _print(meter, args, scan, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
