"""``magnet registry``: manage registered models (``promote NAME VERSION --alias champion``)."""

from __future__ import annotations

import argparse

from magnet.errors import UserError
from magnet.registry.tracking import check_tracking_uri, mask_credentials, resolve_tracking_uri, set_alias


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("registry", help="MLflow model registry: set aliases",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    promote = sub.add_parser("promote", help="point an alias (default champion) at a model version")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="model version number")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import mlflow  # start-up time: MLflow takes seconds to load; the other commands and --help do not need it
    from mlflow.exceptions import MlflowException  # start-up time: the CLI imports this module

    uri = check_tracking_uri(resolve_tracking_uri(args.tracking_uri), "--tracking-uri", existing=True)
    mlflow.set_tracking_uri(uri)
    try:
        set_alias(args.name, args.version, args.alias)
    except MlflowException as e:
        first = str(e.message if hasattr(e, "message") else e).splitlines()[0]
        raise UserError(f"{mask_credentials(uri)}: {args.name} version {args.version}: "
                        f"{mask_credentials(first)}") from None
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0
