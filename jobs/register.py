"""Register a pretraining run's model: `python -m jobs.register --run RUN_ID [--name N] [--alias A]`.

The checkpoint is the run's final one (MLflow tag audio_jepa.checkpoint) unless --checkpoint is given.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.common import die, tracking_uri_or_die


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.register", description=__doc__)
    p.add_argument("--run", required=True, help="MLflow run id of the pretraining run")
    p.add_argument("--name", help="registered model name (default: the run's mlflow.registered_model)")
    p.add_argument("--alias", default=None, help="alias to point at the new version (default: the run's mlflow.alias, "
                   "'current' unless configured)")
    p.add_argument("--checkpoint", help="checkpoint dir (default: the run's final checkpoint)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    args = p.parse_args(argv)
    from service import checkpoint as ckpt
    from service.encoder import checkpoint_state
    from service.registry import register_run
    from service.tracking import client
    uri = tracking_uri_or_die(args.tracking_uri)
    run = client(uri).get_run(args.run)
    checkpoint = args.checkpoint or run.data.tags.get("audio_jepa.checkpoint")
    if not checkpoint:
        die(f"run {args.run} has no audio_jepa.checkpoint tag; pass --checkpoint")
    cfg = ckpt.config_of(checkpoint_state(checkpoint))
    cfg.mlflow.tracking_uri = uri
    name = args.name or cfg.mlflow.registered_model
    if not name:
        die("no model name: pass --name (the run's config has no mlflow.registered_model)")
    out = register_run(cfg, args.run, checkpoint, name=name, alias=args.alias or cfg.mlflow.alias)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
