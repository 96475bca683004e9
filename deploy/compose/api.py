"""The seeds' `api` service for the compose demo (Python stdlib only).

Two jobs, like a pod with a projected service-account token:

1. Token refresh, as the kubelet does for projected volumes: request a token for
   serviceaccount NAMESPACE/SERVICE_ACCOUNT with audience AUDIENCE through the TokenRequest
   API (POST /api/v1/namespaces/NS/serviceaccounts/SA/token), write it atomically to
   TOKEN_PATH, and request a new one once 80% of its lifetime has passed (the kubelet's rule),
   retrying with backoff on failure.
2. On every HTTP request to LISTEN: re-read the token file (as applications should), call
   DATA_STORE_URL with the token in X-Client-Id, and relay the answer.

Environment: APISERVER, CA_FILE, MINTER_TOKEN_FILE (a credential allowed to create tokens for
that service account only), NAMESPACE, SERVICE_ACCOUNT, AUDIENCE, EXPIRATION_SECONDS (default
600, the API server's minimum), TOKEN_PATH, DATA_STORE_URL, LISTEN (host:port).
Prints "ready http://LISTEN" once serving, "token: minted ..." after each TokenRequest.
"""

import datetime
import http.server
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request

ENV = os.environ
APISERVER = ENV.get("APISERVER", "https://k3s:6443").rstrip("/")
CA_FILE = ENV.get("CA_FILE", "/creds/ca.crt")
MINTER_TOKEN_FILE = ENV.get("MINTER_TOKEN_FILE", "/creds/api-minter.token")
NAMESPACE = ENV.get("NAMESPACE", "api")
SERVICE_ACCOUNT = ENV.get("SERVICE_ACCOUNT", "api")
AUDIENCE = ENV.get("AUDIENCE", "data-store")
EXPIRATION_SECONDS = int(ENV.get("EXPIRATION_SECONDS", "600"))
TOKEN_PATH = ENV.get("TOKEN_PATH", "/var/run/secrets/tokens/api-token")
DATA_STORE_URL = ENV.get("DATA_STORE_URL", "http://data-store:8080/")
LISTEN = ENV.get("LISTEN", "0.0.0.0:8000")

# The kubelet refreshes a projected token once 80% of its TTL has passed.
REFRESH_FRACTION = 0.8

token_ready = threading.Event()


def parse_time(value):
    """RFC 3339 'YYYY-MM-DDTHH:MM:SSZ' (the API server's format) -> unix seconds."""
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def request_token():
    """One TokenRequest; returns (token, expiration unix seconds)."""
    with open(MINTER_TOKEN_FILE) as f:
        minter = f.read().strip()
    body = json.dumps({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [AUDIENCE], "expirationSeconds": EXPIRATION_SECONDS},
    }).encode()
    url = f"{APISERVER}/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}/token"
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": f"Bearer {minter}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    })
    ctx = ssl.create_default_context(cafile=CA_FILE)
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        status = json.load(resp)["status"]
    return status["token"], parse_time(status["expirationTimestamp"])


def write_atomically(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def refresher():
    """Keeps TOKEN_PATH fresh forever."""
    backoff = 1.0
    while True:
        try:
            issued = time.time()
            token, expires = request_token()
            write_atomically(TOKEN_PATH, token)
            ttl = max(expires - issued, 1.0)
            refresh_in = ttl * REFRESH_FRACTION
            print(f"token: minted for {NAMESPACE}/{SERVICE_ACCOUNT} audience={AUDIENCE} "
                  f"ttl={ttl:.0f}s refresh_in={refresh_in:.0f}s", flush=True)
            token_ready.set()
            backoff = 1.0
            time.sleep(refresh_in)
        except Exception as e:  # keep the old token (still valid) and retry
            print(f"token: request failed: {e}; retrying in {backoff:.0f}s", file=sys.stderr,
                  flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(TOKEN_PATH) as f:
            token = f.read().strip()
        req = urllib.request.Request(DATA_STORE_URL, headers={"X-Client-Id": token})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        except Exception as e:
            status, body = 502, f"data-store unreachable: {e}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"api: {self.address_string()} {fmt % args}", flush=True)


def main():
    threading.Thread(target=refresher, daemon=True).start()
    token_ready.wait()
    host, port = LISTEN.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    print(f"ready http://{host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
