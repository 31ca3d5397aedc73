"""Move an alias to a registered version: `python -m jobs.promote NAME VERSION --alias champion`."""
from __future__ import annotations

import argparse
import sys

from jobs.common import die, tracking_uri_or_die


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__)
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    args = p.parse_args(argv)
    uri = tracking_uri_or_die(args.tracking_uri)
    from service.registry import promote
    try:
        promote(args.name, args.version, args.alias, uri)
    except Exception as e:  # MlflowException: unknown model/version
        die(f"cannot point {args.alias} at {args.name} version {args.version}: {e}", 1)
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
