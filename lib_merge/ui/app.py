"""The standalone Merge Lab app: `python -m lib_merge ui [--port 7861] [--models-dir ./models] ...`.

A gr.Blocks page with a "Merge" tab (more tabs later) over a StandaloneHost, queued so long merges stream
their progress and Interrupt works, and the HTTP API (/merge-lab/v1/, docs/API.md) on the same server,
so scripts can merge and generate too; served on 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSS = """
#merge_lab_status .merge-lab-warnings { font-weight: 400; margin: 0.25em 0 0 1.2em; }
"""


def make_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_merge ui", description="The Merge Lab app in your browser.",
                                add_help=add_help)
    p.add_argument("--port", type=int, default=7861, help="port to serve on (default 7861)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 exposes the "
                        "app, and the files it can read, to your network)")
    p.add_argument("--models-dir", default="models",
                   help="folder of checkpoints (default ./models; LoRAs in models/Lora)")
    p.add_argument("--output-dir", default="outputs", help="folder for saved merges (default ./outputs)")
    p.add_argument("--cache-mb", type=int, default=4096,
                   help="memory for live re-merges, MB (default 4096): the merged inputs are kept in memory so a "
                        "slider change re-merges without reading the files; above it, only the changed tensors "
                        "are read again")
    p.add_argument("--concurrency", type=int, default=2,
                   help="jobs that may run at once (merges still run one at a time)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login for the page and the HTTP API")
    p.add_argument("--auth-file", metavar="FILE", help="require a login from this file (one USER:PASS per line)")
    p.add_argument("--insecure", action="store_true",
                   help="serve on an address other than this computer's without a login (only on a trusted network)")
    return p


def read_auth(args) -> list[tuple[str, str]]:
    """The logins of --auth and --auth-file, with a sentence for a malformed one."""
    from ..core.errors import InputError
    lines = [args.auth] if getattr(args, "auth", None) else []
    if getattr(args, "auth_file", None):
        try:
            lines += [ln.strip() for ln in open(args.auth_file, encoding="utf-8") if ln.strip()]
        except OSError as e:
            raise InputError(f"Cannot read the auth file '{args.auth_file}': {e.strerror}.") from None
    logins = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise InputError("A login is USER:PASS, both parts given (e.g. --auth merge:secret).")
        logins.append((user, password))
    return logins


def check_exposure(address: str, logins: list, insecure: bool) -> None:
    """Serving beyond this computer without a login exposes every file the app can read: refused, saying why."""
    from ..core.errors import InputError
    if address in ("127.0.0.1", "localhost", "::1") or logins or insecure:
        return
    raise InputError(f"Serving on {address} lets anyone on your network use the app and read every file it can "
                     f"read: give --auth USER:PASS (or --auth-file FILE), or --insecure on a network you trust.")


def build_app(host):
    """The page: a Blocks app with the Merge tab."""
    import gradio as gr

    from .tab import build_tab

    css = CSS
    style = ROOT / "style.css"
    if style.is_file():
        css = style.read_text(encoding="utf-8") + css
    merge_tab = build_tab(host)  # built outside the page's context, then rendered in it (as the WebUI does)
    with gr.Blocks(title="Merge Lab", css=css, analytics_enabled=False) as app:
        with gr.Tabs():
            with gr.Tab("Merge", id="merge", elem_id="merge_lab_tab"):
                merge_tab.render()
    return app


def queue(app, concurrency: int):
    """Enable the queue on gradio 3.x (concurrency_count) and 4.x+ (default_concurrency_limit)."""
    import gradio as gr
    if int(gr.__version__.split(".")[0]) >= 4:
        return app.queue(default_concurrency_limit=concurrency)
    return app.queue(concurrency_count=concurrency)


def main(argv: list[str] | None = None) -> int:
    return run(make_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..host.standalone import StandaloneHost

    logins = read_auth(args)
    check_exposure(args.host, logins, args.insecure)
    host = StandaloneHost(args.models_dir, args.output_dir, settings={"merge_lab_cache_mb": args.cache_mb})
    print(f"Merge Lab: models from {host.models_dir}, merges saved to {host.output_folder}", flush=True)
    for p in host.remove_stale_partials():
        print(f"Merge Lab: removed {p}, left over by a save that did not finish", flush=True)
    server = make_server(host, args.concurrency, logins)
    print(f"Merge Lab: open http://{args.host}:{args.port} (HTTP API under /merge-lab/v1/)", flush=True)
    import uvicorn
    uvicorn.run(server, host=args.host, port=args.port, log_level="warning")
    return 0


def make_server(host, concurrency: int = 2, logins: list[tuple[str, str]] | None = None):
    """One FastAPI app: the HTTP API (lib_merge.api) and the page, mounted at / (gradio 3.x and 4.x). With
    logins, the API takes HTTP basic auth and the page gradio's login."""
    import gradio as gr
    from fastapi import FastAPI

    from ..api import register_routes
    server = FastAPI()
    from ..host.auth import basic_auth
    register_routes(server, host, [basic_auth(logins)] if logins else None)   # before the page takes /
    app = queue(build_app(host), concurrency)
    if logins:
        app.auth, app.auth_message = list(logins), None   # what launch(auth=...) sets; the mounted page uses it
    return gr.mount_gradio_app(server, app, path="/")


if __name__ == "__main__":
    raise SystemExit(main())
