// The request header rules of RFC 9113 sections 8.1-8.3 as a pure function: what a well-formed
// request yields, and the reason a malformed one is refused (the server resets its stream).

import assert from "node:assert/strict";
import type { Header } from "../src/transport/hpack.ts";
import { parseRequestHeaders, trailersProblem } from "../src/transport/request_headers.ts";

const GRPC: Header[] = [
  [":method", "POST"],
  [":scheme", "http"],
  [":path", "/AWS.SageMaker.Edge.Agent/ListModels"],
  [":authority", "localhost"],
  ["content-type", "application/grpc"],
  ["te", "trailers"],
  ["grpc-timeout", "1S"],
];

function reason(headers: Header[]): string {
  const result = parseRequestHeaders(headers);
  assert.ok("malformed" in result, `accepted ${JSON.stringify(headers)}`);
  return result.malformed;
}

Deno.test("a gRPC request's headers give the method, path, fields and declared length", () => {
  const head = parseRequestHeaders([...GRPC, ["content-length", "5"], ["content-length", "5"]]);
  assert.ok(!("malformed" in head));
  assert.equal(head.method, "POST");
  assert.equal(head.path, "/AWS.SageMaker.Edge.Agent/ListModels");
  assert.equal(head.authority, "localhost");
  assert.equal(head.contentLength, 5);
  assert.equal(head.fields.get("grpc-timeout"), "1S");
  assert.ok(!("malformed" in parseRequestHeaders([...GRPC.filter(([n]) => n !== "te"), ["te", "Trailers"]])));
  const connect = parseRequestHeaders([[":method", "CONNECT"], [":authority", "example:443"]]);
  assert.ok(!("malformed" in connect) && connect.path === "" && connect.scheme === "");
});

Deno.test("malformed request headers are refused with the rule they break", () => {
  const cases: [Header[], RegExp][] = [
    [[...GRPC, ["X-Upper", "1"]], /character HTTP\/2 forbids/],
    [[...GRPC, ["x-sp ace", "1"]], /character HTTP\/2 forbids/],
    [[...GRPC, ["x-colon:", "1"]], /character HTTP\/2 forbids/],
    [[...GRPC, ["", "1"]], /empty field name/],
    [[...GRPC, ["x-v", "a\r\nb"]], /NUL, CR or LF/],
    [[...GRPC, ["x-v", " padded"]], /whitespace/],
    [[...GRPC, ["connection", "close"]], /connection-specific field connection/],
    [[...GRPC, ["te", "gzip"]], /te other than "trailers"/],
    [[...GRPC, [":foo", "1"]], /pseudo-header :foo after a regular field/],
    [[[":foo", "1"], ...GRPC], /:foo is not a request pseudo-header/],
    [[[":status", "200"], ...GRPC], /:status is not a request pseudo-header/],
    [[[":path", "/x"], ...GRPC], /:path appears twice/],
    [GRPC.filter(([n]) => n !== ":method"), /no :method/],
    [GRPC.filter(([n]) => n !== ":scheme"), /no :scheme/],
    [GRPC.map(([n, v]): Header => [n, n === ":path" ? "" : v]), /no :path/],
    [[...GRPC, ["content-length", "-1"]], /content-length "-1"/],
    [[...GRPC, ["content-length", "5"], ["content-length", "6"]], /not one length/],
    [[...GRPC, ["host", "other"]], /host differs from :authority/],
    [[[":method", "CONNECT"], [":authority", "x:1"], [":path", "/"]], /CONNECT needs/],
  ];
  for (const [headers, expected] of cases) assert.match(reason(headers), expected);
});

Deno.test("trailers carry no pseudo-headers and no connection-specific fields", () => {
  assert.equal(trailersProblem([["x-checksum", "0"]]), null);
  assert.match(trailersProblem([[":path", "/"]])!, /pseudo-header :path in trailers/);
  assert.match(trailersProblem([["transfer-encoding", "chunked"]])!, /connection-specific/);
  assert.match(trailersProblem([["Upper", "1"]])!, /forbids/);
});
