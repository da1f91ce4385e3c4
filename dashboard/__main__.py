"""``python -m dashboard [--host H] [--port P] [--redis-url URL]``: serve the dashboard with
waitress (a pure-Python production WSGI server)."""

from __future__ import annotations

import argparse
import os
import sys

from dashboard.access import READ_TOKEN_ENV, TRUST_HEADER_ENV, AccessError
from dashboard.app import LOCAL_HOSTS, TOKEN_ENV, create_app
from dashboard.coverage import DEFAULT_SAMPLE
from workers.paths import UnsafeCache, private_dir
from workers.settings import Settings

DEFAULT_PORT = 8000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dashboard",
                                description="Serve the fuzz farm's findings dashboard.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1); beyond localhost, "
                        f"{TOKEN_ENV} must be set")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help=f"the farm's Redis (default: $REDIS_URL or {Settings.redis_url})")
    p.add_argument("--threads", type=int, default=8, help="request threads (default: 8)")
    p.add_argument("--coverage-sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help="inputs a coverage sample boots on a worker (default: "
                        f"{DEFAULT_SAMPLE})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = os.environ.get(TOKEN_ENV) or None
    local = args.host in LOCAL_HOSTS
    if not local and token is None:
        print(f"dashboard: refusing to listen on {args.host} without {TOKEN_ENV} set "
              f"(it guards the buttons that send work to the farm)", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"dashboard: bad port {args.port}", file=sys.stderr)
        return 2
    read_token = os.environ.get(READ_TOKEN_ENV) or None
    trust_header = os.environ.get(TRUST_HEADER_ENV) or None
    try:
        private_dir(Settings.from_env().cache_dir)
        app = create_app(args.redis_url, token=token, local=local,
                         coverage_sample=max(1, args.coverage_sample), read_token=read_token,
                         trust_header=trust_header)
    except (AccessError, UnsafeCache) as e:
        print(f"dashboard: {e}", file=sys.stderr)
        return 2
    from waitress import serve

    listen = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    print(f"dashboard: http://{listen}/", file=sys.stderr, flush=True)
    guards = ([f"the read token ({READ_TOKEN_ENV})"] if read_token else []) + (
        [f"the {trust_header} header of a reverse proxy"] if trust_header else [])
    if guards:
        print(f"dashboard: pages need {' or '.join(guards)}", file=sys.stderr, flush=True)
    serve(app, listen=listen, threads=max(1, args.threads), ident="fuzzfarm-dashboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
