"""``kvtier`` command line: ``kvtier serve [--host H] [--port P] [--grpc-port G] [--local-socket PATH] [--config FILE]``,
``kvtier settings [--markdown]`` and ``kvtier demo [--tokens N] [--turns N] [--service URL] ...``.

``serve`` runs the REST server (uvicorn) and, unless ``grpc_port`` is empty, the gRPC server in
the same process, over one store. SIGTERM / SIGINT stop it gracefully: the listening sockets
close, in-flight requests get ``graceful_shutdown_s`` to finish, then the store is closed (the
disk tier writes every block atomically, so it is consistent whenever the process stops).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

log = logging.getLogger("kvtier")


def _settings(args):
    from .settings import Settings

    overrides = {
        k: v
        for k, v in dict(
            config=args.config,
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            grpc_port=getattr(args, "grpc_port", None),
            data_dir=getattr(args, "data_dir", None),
            local_socket=getattr(args, "local_socket", None),
            log_level=getattr(args, "log_level", None),
        ).items()
        if v is not None
    }
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    try:
        return Settings(**overrides)
    except (ValidationError, ValueError) as e:
        print(f"kvtier: invalid configuration:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(args) -> int:
    import uvicorn

    from .connections import guarded_http_protocol
    from .rest import create_app

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = settings.bind_problem()
    if problem:
        print(f"kvtier: {problem}", file=sys.stderr)
        return 2
    tiers = [
        name
        for name, cap in (
            ("device", settings.device_capacity_bytes),
            ("host", settings.host_capacity_bytes),
            ("disk", settings.disk_capacity_bytes),
        )
        if cap
    ]
    if settings.redis_url:
        tiers.append("redis")
    log.info(
        "kvtier serving REST on %s://%s:%d (OpenAPI at /docs)%s; tiers: %s; data_dir: %s",
        "http" if settings.tls_cert is None else "https",
        settings.host,
        settings.port,
        (f", gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc_port is not None else "")
        + (f", local transport on unix://{settings.local_socket}" if settings.local_socket is not None else ""),
        ", ".join(tiers),
        settings.data_dir,
    )
    if settings.open_mode:
        log.warning(
            "OPEN MODE: no API keys configured (KVTIER_API_KEYS / KVTIER_ADMIN_KEY): every caller is admin of the "
            "default tenant; serving on %s only",
            settings.host,
        )
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    http_protocol, guard = guarded_http_protocol(settings, app.state.transport_stats)
    tls = {} if settings.tls_cert is None else dict(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http=http_protocol,
        timeout_keep_alive=settings.idle_timeout_s,
        # requests in progress are capped by RequestGuard (health exempt), connections by the guard
        limit_concurrency=None,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        lifespan="on",
        server_header=False,
        **tls,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def demo(args) -> int:
    from kvtier.demo import main as run_demo

    return run_demo(args)


def show_settings(args) -> int:
    from .settings import settings_table

    if args.markdown:
        print(settings_table())
        return 0
    print(json.dumps(_settings(args).redacted(), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier: a KV-cache tier for LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the REST (and gRPC) server")
    p.add_argument("--host", help="bind address (default 127.0.0.1; KVTIER_HOST)")
    p.add_argument("--port", type=int, help="REST port (default 8080; KVTIER_PORT)")
    p.add_argument("--grpc-port", type=lambda v: "" if v == "" else int(v), help="gRPC port (default 50051; '' disables; KVTIER_GRPC_PORT)")
    p.add_argument(
        "--local-socket",
        help="Unix socket of the same-host shared-memory transport; clients use unix://PATH (default off; KVTIER_LOCAL_SOCKET)",
    )
    p.add_argument("--config", help="YAML settings file (KVTIER_CONFIG)")
    p.add_argument("--data-dir", help="directory of the disk tier and the spec registry (KVTIER_DATA_DIR)")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback host with no API keys")
    p.set_defaults(func=serve)
    d = sub.add_parser(
        "demo",
        help="a multi-turn session over one long document on the reference model, through kvtier",
        description="Runs SmolLM2-135M-Instruct (from its installed package; nothing is downloaded) over one "
        "long document, one question per turn, and prints time to first token with and without "
        "the cached prefix, cache hits and bytes per tier, and the answers.",
    )
    d.add_argument("--tokens", type=int, default=4096, help="tokens of the document (default 4096)")
    d.add_argument("--turns", type=int, default=4, help="questions asked in turn, 1-8 (default 4)")
    d.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer (default 16)")
    d.add_argument("--service", metavar="URL", help="use a running kvtier service through the SDK (default: an in-process store)")
    d.add_argument("--api-key", help="API key for --service")
    d.add_argument("--data-dir", help="disk tier of the in-process store (default: a temporary directory, removed at the end)")
    d.add_argument("--config", help="YAML settings of the in-process store (the same as kvtier serve's; KVTIER_* variables apply too)")
    d.add_argument("--block-tokens", type=int, default=256, help="tokens per block (default 256)")
    d.add_argument("--baseline", action="store_true", help="also run every turn without kvtier (one more full prefill per turn)")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    d.set_defaults(func=demo)
    s = sub.add_parser("settings", help="print the effective settings (secrets masked), or the table of every option")
    s.add_argument("--config", help="YAML settings file")
    s.add_argument("--markdown", action="store_true", help="print the Markdown table of every option")
    s.set_defaults(func=show_settings)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
