// The rules a request's header list must follow (RFC 9113 sections 8.1, 8.2 and 8.3). A request
// that breaks one is malformed: the server resets its stream with PROTOCOL_ERROR instead of
// answering it, so no handler ever sees a header list a compliant client could not have sent.

import type { Header } from "./hpack.ts";

/** What the server needs from a well-formed request's headers. */
export interface RequestHead {
  method: string;
  /** Empty for CONNECT, which has no :scheme or :path. */
  scheme: string;
  path: string;
  authority: string;
  /** The declared body length, or null when the request does not declare one. */
  contentLength: number | null;
  /** Regular fields by name (the first value of a repeated field). */
  fields: Map<string, string>;
}

/** Why a header list is malformed. */
export interface MalformedRequest {
  malformed: string;
}

const REQUEST_PSEUDO = new Set([":method", ":scheme", ":authority", ":path"]);

/** Fields that only mean something on one HTTP/1.1 hop; HTTP/2 forbids them (section 8.2.2). */
const CONNECTION_SPECIFIC = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"]);

/**
 * A field name is a lowercase token: no controls, space, uppercase, DEL or non-ASCII (section
 * 8.2.1), and a colon only as a pseudo-header's first character.
 */
function badName(name: string): string | null {
  if (name.length === 0) return "an empty field name";
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    if (c <= 0x20 || c >= 0x7f || (c >= 0x41 && c <= 0x5a) || (c === 0x3a && i > 0)) {
      return `field name ${JSON.stringify(name)} has a character HTTP/2 forbids`;
    }
  }
  return null;
}

/** A field value has no NUL, CR or LF, and no leading or trailing space or tab (section 8.2.1). */
function badValue(name: string, value: string): string | null {
  if (/[\0\r\n]/.test(value)) return `field ${name} has a NUL, CR or LF in its value`;
  if (/^[ \t]|[ \t]$/.test(value)) return `field ${name} has leading or trailing whitespace`;
  return null;
}

/** Checks a request's header list; returns what the server needs, or why it is malformed. */
export function parseRequestHeaders(headers: Header[]): RequestHead | MalformedRequest {
  const pseudo = new Map<string, string>();
  const fields = new Map<string, string>();
  let contentLength: number | null = null;
  let regularSeen = false;
  for (const [name, value] of headers) {
    const problem = badName(name) ?? badValue(name, value);
    if (problem) return { malformed: problem };
    if (name[0] === ":") {
      if (regularSeen) return { malformed: `pseudo-header ${name} after a regular field` };
      if (!REQUEST_PSEUDO.has(name)) return { malformed: `pseudo-header ${name} is not a request pseudo-header` };
      if (pseudo.has(name)) return { malformed: `pseudo-header ${name} appears twice` };
      pseudo.set(name, value);
      continue;
    }
    regularSeen = true;
    if (CONNECTION_SPECIFIC.has(name)) return { malformed: `connection-specific field ${name}` };
    // Tokens are case-insensitive (RFC 9110 section 10.1.4).
    if (name === "te" && value.toLowerCase() !== "trailers") return { malformed: `te other than "trailers"` };
    if (name === "content-length") {
      // Repeated identical values are one length (RFC 9110 section 8.6); anything else is malformed.
      if (!/^[0-9]{1,15}$/.test(value) || (contentLength !== null && contentLength !== Number(value))) {
        return { malformed: `content-length ${JSON.stringify(value)} is not one length` };
      }
      contentLength = Number(value);
    }
    if (!fields.has(name)) fields.set(name, value);
  }
  const method = pseudo.get(":method");
  if (!method) return { malformed: "no :method" };
  const authority = pseudo.get(":authority") ?? "";
  const host = fields.get("host");
  if (host !== undefined && pseudo.has(":authority") && host !== authority) {
    return { malformed: "host differs from :authority" };
  }
  if (method === "CONNECT") {
    // Section 8.5: CONNECT names only its target.
    if (pseudo.has(":scheme") || pseudo.has(":path") || !authority) {
      return { malformed: "CONNECT needs :authority and no :scheme or :path" };
    }
    return { method, scheme: "", path: "", authority, contentLength, fields };
  }
  const scheme = pseudo.get(":scheme");
  const path = pseudo.get(":path");
  if (!scheme) return { malformed: "no :scheme" };
  if (!path) return { malformed: "no :path" };
  return { method, scheme, path, authority, contentLength, fields };
}

/** Why a trailer section is malformed (pseudo-headers or a bad field), or null (section 8.1). */
export function trailersProblem(headers: Header[]): string | null {
  for (const [name, value] of headers) {
    if (name[0] === ":") return `pseudo-header ${name} in trailers`;
    const problem = badName(name) ?? badValue(name, value);
    if (problem) return problem;
    if (CONNECTION_SPECIFIC.has(name)) return `connection-specific field ${name} in trailers`;
  }
  return null;
}
