"""A stand-in for n8n's Webhook node: prints every callback it receives and answers 200.

`make demo` runs it on port 9000 so the whole pipeline can be watched without n8n.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class PrintingHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            shown = json.dumps(json.loads(body), ensure_ascii=False)
        except ValueError:
            shown = body.decode(errors="replace")
        print(
            f"callback {self.path} Idempotency-Key={self.headers.get('Idempotency-Key')} {shown}",
            flush=True,
        )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    print(f"printing callbacks posted to http://{args.host}:{args.port}/", flush=True)
    ThreadingHTTPServer((args.host, args.port), PrintingHandler).serve_forever()


if __name__ == "__main__":
    main()
