#!/usr/bin/env python3
"""An AWS IoT credentials provider stand-in: HTTPS on 127.0.0.1 that REQUIRES a client certificate
signed by --client-ca (Python's ssl module, independent of the agent's TLS stack).

GET /role-aliases/<alias>/credentials answers
  {"credentials":{"accessKeyId","secretAccessKey","sessionToken","expiration"}}
with an expiration --lifetime seconds ahead. --keys lists the access key ids handed out in order
(the last one repeats); the secret equals the key id (s3rver accepts S3RVER/S3RVER). Each answered
request is printed as a JSON line {"path","thing","subject"}; "ready <port>" once listening.
"""

import argparse
import datetime
import http.server
import json
import ssl
import sys
import threading


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600)
    parser.add_argument("--keys", default="S3RVER")
    args = parser.parse_args()
    keys = args.keys.split(",")
    lock = threading.Lock()
    served = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            parts = self.path.split("/")
            if len(parts) != 4 or parts[1] != "role-aliases" or parts[3] != "credentials":
                self.answer(404, {"message": "no such path"})
                return
            thing = self.headers.get("x-amzn-iot-thingname")
            if not thing:
                self.answer(400, {"message": "x-amzn-iot-thingname is missing"})
                return
            with lock:
                key = keys[min(served[0], len(keys) - 1)]
                served[0] += 1
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=args.lifetime)
            subject = dict(x[0] for x in self.connection.getpeercert()["subject"])
            print(json.dumps({"path": self.path, "thing": thing, "subject": subject.get("commonName")}), flush=True)
            self.answer(200, {"credentials": {
                "accessKeyId": key,
                "secretAccessKey": key,
                "sessionToken": f"token-{served[0]}",
                "expiration": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            }})

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.load_verify_locations(args.client_ca)
    context.verify_mode = ssl.CERT_REQUIRED

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # A refused client certificate: say so on stderr and keep serving.
            print(f"handshake refused: {sys.exc_info()[1]}", file=sys.stderr, flush=True)

    server = Server(("127.0.0.1", args.port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
