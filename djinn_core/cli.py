"""The ``djinn`` command: run the claims suite for this machine, build reports, print machine facts, run a diagnostic
probe, serve sessions.

Importing this module, and ``djinn --help``, import neither torch nor the RPC stack: each subcommand imports what it
needs when it runs. ``serve`` and ``probe`` hand the rest of the command line to their own parsers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from djinn_core.errors import ConfigError, DeviceUnavailable, DjinnError

log = logging.getLogger("djinn_core.cli")

SUITE_DIRS = ("tests_core", "tests_exp2", "tests_exp3")
PROFILE_CHOICES = ("auto", "cpu", "gpu", "h100")
# the module whose add_serve_parser(subparsers) defines `djinn serve` (imported only when `djinn serve` runs)
SERVE_PARSER_MODULE = "djinn_core.rpc.cli"
NO_TESTS_COLLECTED = 5  # pytest's exit status when the marker selected nothing


def _suite_root(root: str | None) -> Path:
    path = Path(root or ".").resolve()
    missing = [d for d in ("conftest.py", *SUITE_DIRS) if not (path / d).exists()]
    if missing:
        raise ConfigError(f"djinn run: {path} is not a Djinn checkout (missing {', '.join(missing)}); "
                          "run it from the repository root or pass --root")
    return path


def _profile(requested: str) -> str:
    """The profile to run: the machine's own for ``auto``; a requested one only where the hardware can run it."""
    from djinn_core.bench.profiles import detect_profile, profile_missing_reason

    if requested == "auto":
        return detect_profile()
    reason = profile_missing_reason(requested)
    if reason:
        raise DeviceUnavailable(f"djinn run --profile {requested}: its claims {reason}; nothing was run. "
                                f"`djinn run` picks the profile this machine can run ({detect_profile()}).")
    return requested


def _run_suite(root: Path, profile: str, paths: tuple[str, ...], bench_json: Path, report_name: str,
               pytest_args: list[str]) -> int:
    """One pytest process over ``paths`` (all the suite when empty) writing ``bench_json`` and its report."""
    from djinn_core.bench.report import write_report

    cmd = [sys.executable, "-m", "pytest", "-m", profile, *paths, "--benchmark-json", str(bench_json), "-q",
           "-p", "no:cacheprovider", *pytest_args]
    log.info("running the %s claims: %s", profile, " ".join(cmd))
    rc = subprocess.call(cmd, cwd=root)
    if rc == NO_TESTS_COLLECTED:
        log.warning("pytest collected no %s tests in %s", profile, " ".join(paths) or "the suite")
        rc = 0
    if bench_json.is_file():
        log.info("report: %s", write_report(bench_json, out_dir=bench_json.parent, name=report_name))
    else:
        log.warning("pytest wrote no benchmark JSON (%s): no report", bench_json)
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    """The claims suite of this machine's profile. ``h100`` writes one JSON and report per entry of
    :data:`djinn_core.bench.profiles.H100_REPORTS` (the set committed under ``reports/<gpu>/``), each in its own
    pytest process and at its own VRAM budget; other profiles write ``<profile>.json``."""
    root = _suite_root(args.root)
    profile = _profile(args.profile)
    out = Path(args.out or root / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if profile != "h100":
        return _run_suite(root, profile, (), out / f"{profile}.json", f"{profile}_report", args.pytest_args)
    from djinn_core.bench.profiles import H100_REPORTS

    rc = 0
    for name, (paths, budget) in H100_REPORTS.items():
        extra = [f"--djinn-vram-budget={budget}"] if budget else []
        rc = _run_suite(root, profile, paths, out / f"{name}.json", name, [*extra, *args.pytest_args]) or rc
    return rc


def cmd_report(args: argparse.Namespace) -> int:
    """The report of one JSON; with ``--runs``, the spread over those further runs of it (by default the ones in
    ``runs/`` beside it)."""
    from djinn_core.bench.report import write_report

    print(write_report(args.json, out_dir=args.out_dir, name=args.name, runs=args.runs))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """One report's JSON from the JSONs of its parts (pytest processes of ``-k`` selections at one commit)."""
    from djinn_core.bench.merge import write_merged

    print(write_merged(args.parts, args.out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from djinn_core.bench.provenance import machine_facts

    print(json.dumps(machine_facts(), indent=1, default=str))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from djinn_core.bench import probes

    if args.name is None:
        print(probes.listing())
        if args.list or {"-h", "--help"} & set(args.extra):
            return 0
        raise ConfigError("djinn probe: name a probe (listed above)")
    return probes.run(args.name, args.extra)


def cmd_serve(args: argparse.Namespace) -> int:
    """Parse the rest of the line with the RPC wing's own ``serve`` parser, then run it."""
    parser = argparse.ArgumentParser(prog="djinn")
    importlib.import_module(SERVE_PARSER_MODULE).add_serve_parser(parser.add_subparsers(dest="cmd", required=True))
    serve_args = parser.parse_args(["serve", *args.extra], namespace=argparse.Namespace(verbose=args.verbose))
    return serve_args.fn(serve_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the claims suite for this machine and build its report")
    r.add_argument("--profile", choices=PROFILE_CHOICES, default="auto",
                   help="marker to run (default: detected from the hardware; a profile the hardware cannot run is "
                        "refused)")
    r.add_argument("--out", help="folder for the benchmark JSON and report (default: ./out)")
    r.add_argument("--root", help="repository root holding the suite (default: current folder)")
    r.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    r.set_defaults(fn=cmd_run)

    rep = sub.add_parser("report", help="build a Markdown report with plots from a pytest-benchmark JSON file")
    rep.add_argument("json", help="pytest-benchmark JSON file")
    rep.add_argument("--out-dir", help="folder for the report (default: next to the JSON)")
    rep.add_argument("--name", help="report name (default: the JSON file's stem)")
    rep.add_argument("--runs", nargs="*", metavar="FILE",
                     help="further runs of the same report (pytest-benchmark JSONs at its clean commit) whose spread "
                          "the report records (default: runs/<stem>.run<N>.json beside the JSON; --runs with no FILE: "
                          "none)")
    rep.set_defaults(fn=cmd_report)

    merge = sub.add_parser("merge", help="join the pytest-benchmark JSONs of one report's parts (pytest -k "
                                         "selections at one commit) into one JSON, each part recorded")
    merge.add_argument("parts", nargs="+", help="the parts' JSON files")
    merge.add_argument("-o", "--out", required=True, help="the merged JSON to write")
    merge.set_defaults(fn=cmd_merge)

    info = sub.add_parser("info", help="print this machine's facts (GPU, driver, PCIe, packages)")
    info.set_defaults(fn=cmd_info)

    probe = sub.add_parser("probe", add_help=False,
                           help="run a diagnostic probe: djinn probe NAME [ARGS] (djinn probe --list names them)")
    probe.add_argument("name", nargs="?", help="the probe (djinn probe NAME --help for its arguments)")
    probe.add_argument("--list", action="store_true", help="list the probes")
    probe.set_defaults(fn=cmd_probe, takes_rest=True)

    serve = sub.add_parser("serve", add_help=False,
                           help="serve breakpoint sessions over RPC (djinn serve --help for its arguments)")
    serve.set_defaults(fn=cmd_serve, takes_rest=True)
    sub.add_parser("route", add_help=False, help="one endpoint over several djinn serve workers (djinn route --help)"
                   ).set_defaults(fn=lambda a: importlib.import_module(SERVE_PARSER_MODULE).main_route(a),
                                  takes_rest=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except (DjinnError, OSError) as e:  # a clear message, not a traceback: bad input, missing hardware or files
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
