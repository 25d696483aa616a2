"""`detr-serve` console script: flags -> Settings -> uvicorn.

Flags are generated from the Settings fields so the two never drift apart.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from app.config import Settings
from app.errors import describe_error
from app.process.malloc_tuning import cap_arenas
from app.process.openmp_policy import set_openmp_policy


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr-serve",
        description="Serve a deformable-attention object detector over HTTP. Every flag is also "
        "an environment variable DETR_SERVE_<FLAG> (e.g. DETR_SERVE_PORT=8080).",
    )
    for name, field in Settings.model_fields.items():
        env = "DETR_SERVE_" + name.upper()
        kind = _base_type(field.annotation)
        default = field.default
        help_text = f"{field.description or ''} [env {env}; default {default}]".strip()
        if kind is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif get_origin(kind) is Literal:
            parser.add_argument(
                _flag(name), dest=name, choices=list(get_args(kind)), default=None, help=help_text
            )
        elif name == "model":
            # Repeatable: more than one --model serves them all (the `models` setting).
            parser.add_argument(
                _flag(name), dest=name, action="append", default=None, help=help_text
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Parse flags and the environment; exit with a readable message when a value is wrong."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "model" in given:
        paths = given["model"]
        if len(paths) > 1:
            given["models"] = ",".join(paths)
        given["model"] = paths[0]
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = ["detr-serve: invalid settings:"]
        for err in exc.errors():
            if err["loc"]:
                field = str(err["loc"][0])
                where = f"{_flag(field)} / DETR_SERVE_{field.upper()}"
                problem = describe_error(err, where=where, plain=True)
                lines.append(f"  {problem} (got {err.get('input')!r})")
                continue
            # Settings that contradict each other (config.contradictions): one line each,
            # with the flags and variables of the settings it names.
            for problem in err["msg"].removeprefix("Value error, ").splitlines():
                named = [n for n in Settings.model_fields if re.search(rf"\b{n}\b", problem)]
                where = ", ".join(f"{_flag(n)} / DETR_SERVE_{n.upper()}" for n in named)
                lines.append(f"  {problem}" + (f" [{where}]" if where else ""))
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    # Read when torch loads libgomp: before anything imports torch (app/process/openmp_policy.py).
    set_openmp_policy(settings.engine_process)
    cap_arenas()
    from app.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.json_logs)
    if settings.engine_process:
        # Imports nothing of the app's HTTP side or torch here: the supervisor must set up
        # Prometheus' multiprocess directory before prometheus_client is first imported.
        from app.process.supervisor import serve

        raise SystemExit(serve(settings))
    import uvicorn

    from app.api.http.server_limits import uvicorn_limits
    from app.main import create_app

    server: uvicorn.Server | None = None

    def stop_on_load_failure() -> None:
        assert server is not None
        server.should_exit = True

    app = create_app(settings, grpc_workers=1, on_load_failure=stop_on_load_failure)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
            **uvicorn_limits(settings),
        )
    )
    server.run()
    if app.state.runtime.state == "failed":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
