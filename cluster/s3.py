"""The local cluster's S3 store: moto's server with authentication on and its admin API out of reach.

    AUDIO_JEPA_S3_KEY=... AUDIO_JEPA_S3_SECRET=... python -m cluster.s3 --port P

Plain `moto.server` answers anonymous requests and serves `/moto-api/` (reset the store, switch
authentication off, dump every object and key) to anyone who can reach the port.  Here moto's own IAM
check is on from the first request, one IAM user holds the one access key (taken from the environment,
never from the command line, where any local user could read it) with S3 rights only, and the WSGI app
refuses `/moto-api/` and any request that carries no AWS signature before moto sees it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# moto reads this when it is imported: 0 = authenticate every request, the first one included
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"

USER = "audio-jepa"
S3_ONLY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def add_user(key: str, secret: str) -> None:
    """The IAM user whose access key signs every request: `key`/`secret`, allowed S3 and nothing else."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user("us-east-1", USER)
    iam.put_user_policy(USER, "s3-only", json.dumps(S3_ONLY))
    access = iam.create_access_key(USER)
    access.access_key_id, access.secret_access_key = key, secret  # moto's documented way to fix a key's value


def guarded(app):
    """Refuse what moto would answer without checking a signature: its admin API and unsigned requests."""
    def refuse(start_response, why: str):
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                f"<Message>{why}</Message></Error>").encode()
        start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def wsgi(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            return refuse(start_response, "moto's admin API is disabled on this server")
        signed = environ.get("HTTP_AUTHORIZATION", "").startswith("AWS4-HMAC-SHA256 ") or \
            "X-Amz-Signature=" in environ.get("QUERY_STRING", "")
        if not signed:
            return refuse(start_response, "anonymous requests are refused: sign them with the cluster's access key")
        return app(environ, start_response)
    return wsgi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.s3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    key, secret = os.environ.get("AUDIO_JEPA_S3_KEY"), os.environ.get("AUDIO_JEPA_S3_SECRET")
    if not (key and secret):
        print("AUDIO_JEPA_S3_KEY and AUDIO_JEPA_S3_SECRET must be set", file=sys.stderr)
        return 2
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple
    add_user(key, secret)
    run_simple(args.host, args.port, guarded(DomainDispatcherApplication(create_backend_app)), threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
