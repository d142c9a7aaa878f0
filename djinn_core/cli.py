"""The ``djinn`` command: run the claims suite for this machine, build reports, print machine facts, serve."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("djinn_core.cli")

SUITE_DIRS = ("tests_core", "tests_exp2", "tests_exp3")


def detect_profile() -> str:
    """``h100`` where an H100-class GPU (>= 75 GiB) is present, ``gpu`` for a smaller CUDA GPU, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "h100" if torch.cuda.get_device_properties(0).total_memory >= 75 * 2**30 else "gpu"


def _suite_root(root: str | None) -> Path:
    path = Path(root or ".").resolve()
    missing = [d for d in ("conftest.py", *SUITE_DIRS) if not (path / d).exists()]
    if missing:
        raise SystemExit(f"djinn run: {path} is not a Djinn checkout (missing {', '.join(missing)}); "
                         "run it from the repository root or pass --root")
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from djinn_core.bench.report import write_report

    root = _suite_root(args.root)
    profile = args.profile if args.profile != "auto" else detect_profile()
    out = Path(args.out or root / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench_json = out / f"{profile}.json"
    cmd = [sys.executable, "-m", "pytest", "-m", profile, "--benchmark-json", str(bench_json), "-q",
           "-p", "no:cacheprovider", *args.pytest_args]
    log.info("running the %s claims suite: %s", profile, " ".join(cmd))
    rc = subprocess.call(cmd, cwd=root)
    if rc == 5:
        log.warning("pytest collected no %s tests", profile)
        rc = 0
    if bench_json.is_file():
        md = write_report(bench_json, out_dir=out, name=f"{profile}_report")
        log.info("report: %s", md)
    return rc


def cmd_report(args: argparse.Namespace) -> int:
    from djinn_core.bench.report import write_report

    md = write_report(args.json, out_dir=args.out_dir, name=args.name)
    print(md)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from djinn_core.bench.provenance import machine_facts

    print(json.dumps(machine_facts(), indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the claims suite for this machine and build its report")
    r.add_argument("--profile", choices=["auto", "cpu", "gpu", "h100"], default="auto",
                   help="marker to run (default: detected from the hardware)")
    r.add_argument("--out", help="folder for the benchmark JSON and report (default: ./out)")
    r.add_argument("--root", help="repository root holding the suite (default: current folder)")
    r.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    r.set_defaults(fn=cmd_run)

    rep = sub.add_parser("report", help="build a Markdown report with plots from a pytest-benchmark JSON file")
    rep.add_argument("json", help="pytest-benchmark JSON file")
    rep.add_argument("--out-dir", help="folder for the report (default: next to the JSON)")
    rep.add_argument("--name", help="report name (default: the JSON file's stem)")
    rep.set_defaults(fn=cmd_report)

    info = sub.add_parser("info", help="print this machine's facts (GPU, driver, PCIe, packages)")
    info.set_defaults(fn=cmd_info)

    import importlib.util

    if importlib.util.find_spec("djinn_core.rpc.server") is not None:
        from djinn_core.rpc.server import add_serve_parser

        add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except Exception as e:  # a clear message, not a traceback, for bad input
        from djinn_core.errors import DjinnError

        if isinstance(e, DjinnError):
            log.error("%s", e)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
