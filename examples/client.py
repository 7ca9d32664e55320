"""Send an image to an ipcserve server and print the model's answer.

Usage::

    python examples/client.py http://127.0.0.1:8000 digit.png

If the server was started with ``--api-key KEY``, set ``IPCSERVE_API_KEY=KEY``.
Exit status: 0 with the JSON answer on stdout, 1 with the error on stderr.
Needs ``requests`` (``pip install requests``).
"""

import json
import mimetypes
import os
import sys
import time

import requests

RETRIES = 3  # extra attempts when the server answers 503 (starting, restarting, overloaded)


def predict(server: str, image_path: str) -> requests.Response:
    """POST the image file as the raw request body to ``/predict``; retry on 503."""
    with open(image_path, "rb") as f:
        data = f.read()
    headers = {"Content-Type": mimetypes.guess_type(image_path)[0] or "application/octet-stream"}
    api_key = os.environ.get("IPCSERVE_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(RETRIES + 1):
        # (connect timeout, read timeout) in seconds: never wait forever.
        response = requests.post(f"{server.rstrip('/')}/predict", data=data, headers=headers,
                                 timeout=(5, 60))
        if response.status_code != 503 or attempt == RETRIES:
            return response
        # 503 means "try again shortly"; the server says how long in Retry-After (seconds).
        try:
            delay = float(response.headers.get("Retry-After", "1"))
        except ValueError:  # an HTTP date instead of seconds: just wait a second
            delay = 1.0
        print(f"server busy (503), retrying in {delay:g}s", file=sys.stderr)
        time.sleep(min(max(delay, 0.0), 30.0))
    raise AssertionError("unreachable")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} SERVER_URL IMAGE_PATH", file=sys.stderr)
        return 2
    try:
        response = predict(argv[1], argv[2])
    except (OSError, requests.RequestException) as exc:  # unreadable file, no server, timeout
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:  # not JSON (a proxy's HTML error page, say)
        body = None
    if not response.ok:
        # ipcserve errors look like {"error": "<message>", "type": "<ErrorType>"}.
        error = body.get("error") if isinstance(body, dict) else None
        detail = f"{body.get('type')}: {error}" if isinstance(error, str) else response.text[:200]
        print(f"error: HTTP {response.status_code} {detail}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))  # e.g. {"label": 7, "probabilities": [...]}
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
