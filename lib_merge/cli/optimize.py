"""`optimize run | resume | report | list`: AutoMBW from the command line (docs/AUTOMBW.md).

In-process runs use the standalone host (diffusers generation) on --models-dir; `--webui URL` drives a
running WebUI or standalone app that has Merge Lab over its API instead; `--workers N` / `--ray-address`
run candidates on Ray actors. Exit 0 when the run ends (budget, patience or Interrupt: resume continues
it), 2 on a user error, with a sentence saying what and where, and no run folder left half-made.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..core.errors import InputError


def _host(args, generate: bool | None = None):
    """The standalone host: it runs the trials in this process, and saves the best merge (save_best)."""
    from ..host.standalone import StandaloneHost
    settings = {"merge_lab_cache_mb": args.cache_mb}
    if args.device:
        from ..core.devices import check_device
        settings["merge_lab_device"] = str(check_device(args.device))   # a sentence now, not a failed trial later
    if args.imagereward_dir:
        settings["merge_lab_imagereward_dir"] = args.imagereward_dir
    return StandaloneHost(models_dir=args.models_dir, output_dir=args.output_dir, settings=settings, generate=generate)


def _auth(args):
    if not args.webui_auth:
        return None
    user, sep, password = args.webui_auth.partition(":")
    if not sep:
        raise InputError("--webui-auth must be USER:PASSWORD.")
    return user, password


def _execute(args, log) -> int:
    from ..optimize.jobs import execute
    elsewhere = bool(args.webui or args.workers or args.ray_address)
    host = _host(args, generate=False if elsewhere else None)   # trials elsewhere: this host only saves
    try:
        result = execute(log, host=host, webui=args.webui, auth=_auth(args), workers=args.workers,
                         ray_address=args.ray_address, echo=print)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the completed trials are in {log.folder}; continue with\n"
              f"  python -m lib_merge optimize resume {log.folder}")
        return 130
    print(f"Run folder: {result['folder']}")
    return 0


def cmd_run(args) -> int:
    from ..optimize.config import check_config, read_config
    from ..optimize.runner import start_run
    config_path = Path(args.config)
    config = check_config(read_config(config_path), str(config_path))
    if args.models_dir:
        config["models_dir"] = args.models_dir
    args.models_dir = args.models_dir or config.get("models_dir") or "models"
    host = _host(args)
    run_dir = Path(args.run_dir) if args.run_dir else None
    existed = run_dir is not None and run_dir.exists()
    log = start_run(config, host, root=Path(args.output_dir) / "autombw", base_dir=config_path.parent.resolve(),
                    run_dir=run_dir)
    try:
        return _execute(args, log)
    except InputError:
        if not log.trials() and not existed:
            shutil.rmtree(log.folder, ignore_errors=True)   # nothing half-written: no trial ran
        raise


def cmd_resume(args) -> int:
    from ..optimize.runlog import RunLog
    log = RunLog.open(args.run_dir)
    state = log.state()
    if state.get("state") == "done" and not args.force:
        print(f"{log.folder} is done ({state.get('trials', 0)} trials): nothing to resume "
              f"(raise budget.trials in its config.json to go on).")
        return 0
    args.models_dir = args.models_dir or log.config().get("models_dir") or "models"
    return _execute(args, log)


def cmd_report(args) -> int:
    from ..optimize.report import draw_report
    from ..optimize.runlog import RunLog
    from ..optimize.runner import Run
    run = Run(RunLog.open(args.run_dir))
    for path in draw_report(run):
        print(f"wrote {path}")
    status = run.status()
    best = status["best"]
    print(f"{status['trials']} trials ({status['failed']} failed), state {status['state']}; best "
          + (f"{best['score']:.4f} at trial {best['trial']}" if best else "none"))
    for h in run.holdouts:
        if h["score"] is not None:
            print(f"  holdout trial {h['trial']}: {h['score']:.4f} (training {h['train_score']:.4f})")
    return 0


def cmd_list(args) -> int:
    from ..optimize.runlog import list_runs
    runs = list_runs(Path(args.root))
    if not runs:
        print(f"No runs under {args.root}.")
    for r in runs:
        best = "-" if r["best"] is None else f"{r['best']:.4f}"
        print(f"{r['run']:40s} {r['state']:9s} {r['trials']:5d} trials  best {best}")
    return 0


def _exec_flags(p) -> None:
    p.add_argument("--models-dir", default=None, help="folder of checkpoints for model names (default: the config's models_dir, else ./models)")
    p.add_argument("--output-dir", default="outputs", help="where runs go (OUTPUT/autombw/...) and saved merges")
    p.add_argument("--device", default=None, help="merge device: cpu, cuda, cuda:1 ...")
    p.add_argument("--cache-mb", type=int, default=4096, help="live re-merge memory budget in MB (default 4096)")
    p.add_argument("--imagereward-dir", default=None, help="local ImageReward folder (ImageReward.pt, med_config.json, bert-base-uncased/)")
    p.add_argument("--webui", default=None, metavar="URL", help="drive a running WebUI / standalone app with Merge Lab over its API")
    p.add_argument("--webui-auth", default=None, metavar="USER:PASSWORD", help="for a WebUI started with --api-auth")
    p.add_argument("--workers", type=int, default=0, help="run candidates on N local Ray actors (one host each)")
    p.add_argument("--ray-address", default=None, help="join a Ray cluster (e.g. auto or ray://host:10001)")


def add_optimize_commands(sub) -> None:
    o = sub.add_parser("optimize", help="AutoMBW: search a merge's block weights (Bayesian optimisation)")
    osub = o.add_subparsers(dest="optimize_command", required=True)
    r = osub.add_parser("run", help="start a run from a config (JSON or YAML)")
    r.add_argument("config", help="the run config, JSON or YAML (docs/AUTOMBW.md; the tab writes one)")
    r.add_argument("--run-dir", default=None, help="the run folder (default OUTPUT/autombw/<time>-<name>)")
    _exec_flags(r)
    r.set_defaults(func=cmd_run)
    s = osub.add_parser("resume", help="continue a run folder after a stop or a crash")
    s.add_argument("run_dir", help="the run folder (outputs/autombw/<time>-<name>)")
    s.add_argument("--force", action="store_true", help="resume even a finished run (after raising its budget)")
    _exec_flags(s)
    s.set_defaults(func=cmd_resume)
    g = osub.add_parser("report", help="redraw a run folder's plots and print its summary")
    g.add_argument("run_dir", help="the run folder (outputs/autombw/<time>-<name>)")
    g.set_defaults(func=cmd_report)
    li = osub.add_parser("list", help="the runs in a folder, with their state")
    li.add_argument("--root", default="outputs/autombw", help="the folder holding the run folders")
    li.set_defaults(func=cmd_list)
