// Certificate method (spec 4.1, 8.2): the bundle carries the leaf and its CA chain; the verifier holds the
// trusted roots. The path is built from the leaf upward through the bundle's certificates to a trusted root,
// checking at `now` each certificate's validity, signature, and the extensions its role needs (RFC 5280
// basics: no revocation and no name constraints, which a critical extension refusal keeps honest).

import * as x509 from "./x509.ts";
import { type CertificateRef, OmsError, type OmsErrorCode } from "./errors.ts";
import { bytesEqual, hexEncode, pemBlocks, toArrayBuffer } from "./encoding.ts";
import { describeSpki } from "./keys.ts";

export interface CertificateInfo {
  role: "leaf" | "intermediate" | "root";
  subject: string;
  issuer: string;
  serialNumber: string;
  notBefore: string;
  notAfter: string;
  /** SHA-256 of the DER certificate, hex. */
  sha256Fingerprint: string;
  keyAlgorithm: string;
  signatureAlgorithm: string;
}

export interface TrustedRoot {
  certificate: x509.X509Certificate;
  der: Uint8Array;
}

const OID = {
  basicConstraints: "2.5.29.19",
  keyUsage: "2.5.29.15",
  extKeyUsage: "2.5.29.37",
  subjectAltName: "2.5.29.17",
  subjectKeyId: "2.5.29.14",
  authorityKeyId: "2.5.29.35",
  certificatePolicies: "2.5.29.32",
  codeSigning: "1.3.6.1.5.5.7.3.3",
  anyExtendedKeyUsage: "2.5.29.37.0",
};

/** Critical extensions this verifier understands (or may safely ignore); any other critical one is refused. */
const KNOWN_CRITICAL = new Set([
  OID.basicConstraints,
  OID.keyUsage,
  OID.extKeyUsage,
  OID.subjectAltName,
  OID.subjectKeyId,
  OID.authorityKeyId,
  OID.certificatePolicies,
]);

const MAX_CHAIN_LENGTH = 10;

export function parseCertificate(der: Uint8Array, where: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(toArrayBuffer(der));
  } catch (error) {
    throw new OmsError(
      "chain",
      "malformed_certificate",
      `${where}: not a valid DER X.509 certificate (${(error as Error).message})`,
    );
  }
}

export async function certificateInfo(
  cert: x509.X509Certificate,
  role: CertificateInfo["role"],
): Promise<CertificateInfo> {
  const fingerprint = new Uint8Array(await cert.getThumbprint("SHA-256"));
  const sigAlg = cert.signatureAlgorithm as Algorithm & { hash?: { name: string } };
  return {
    role,
    subject: cert.subject,
    issuer: cert.issuer,
    serialNumber: cert.serialNumber,
    notBefore: cert.notBefore.toISOString(),
    notAfter: cert.notAfter.toISOString(),
    sha256Fingerprint: hexEncode(fingerprint),
    keyAlgorithm: describeSpki(new Uint8Array(cert.publicKey.rawData)),
    signatureAlgorithm: sigAlg.hash ? `${sigAlg.name} ${sigAlg.hash.name}` : sigAlg.name,
  };
}

function nameBytes(name: x509.Name): Uint8Array {
  return new Uint8Array(name.toArrayBuffer());
}

function sameName(a: x509.Name, b: x509.Name): boolean {
  return bytesEqual(nameBytes(a), nameBytes(b));
}

/** Whether `issuer`'s key made `cert`'s signature; library errors (unsupported algorithm) count as no. */
async function signedBy(cert: x509.X509Certificate, issuer: x509.X509Certificate): Promise<boolean> {
  try {
    return await cert.verify({ publicKey: issuer.publicKey, signatureOnly: true });
  } catch {
    return false;
  }
}

function chainError(code: OmsErrorCode, ref: CertificateRef, message: string): OmsError {
  return new OmsError("chain", code, message, { certificate: ref });
}

function label(ref: CertificateRef): string {
  const where = ref.role === "root" ? `trusted root #${ref.index}` : `bundle certificate #${ref.index}`;
  return `${ref.role} certificate "${ref.subject}" (${where})`;
}

function checkValidity(cert: x509.X509Certificate, ref: CertificateRef, now: Date): void {
  if (now.getTime() > cert.notAfter.getTime()) {
    throw chainError(
      "certificate_expired",
      ref,
      `${label(ref)} expired on ${cert.notAfter.toISOString()} (checked at ${now.toISOString()})`,
    );
  }
  if (now.getTime() < cert.notBefore.getTime()) {
    throw chainError(
      "certificate_not_yet_valid",
      ref,
      `${label(ref)} is not valid before ${cert.notBefore.toISOString()} (checked at ${now.toISOString()})`,
    );
  }
}

function checkCriticalExtensions(cert: x509.X509Certificate, ref: CertificateRef): void {
  for (const ext of cert.extensions) {
    if (ext.critical && !KNOWN_CRITICAL.has(ext.type)) {
      throw chainError(
        "certificate_unsupported_critical_extension",
        ref,
        `${label(ref)} has critical extension ${ext.type}, which this verifier does not process`,
      );
    }
  }
}

function checkLeaf(cert: x509.X509Certificate, ref: CertificateRef, now: Date): void {
  checkValidity(cert, ref, now);
  checkCriticalExtensions(cert, ref);
  const ku = cert.getExtension(x509.KeyUsagesExtension);
  if (ku && !(ku.usages & x509.KeyUsageFlags.digitalSignature)) {
    throw chainError(
      "certificate_key_usage",
      ref,
      `${label(ref)} keyUsage does not allow digitalSignature (has: ${keyUsageNames(ku.usages)})`,
    );
  }
  const eku = cert.getExtension(x509.ExtendedKeyUsageExtension);
  if (eku) {
    const usages = eku.usages.map(String);
    if (!usages.includes(OID.codeSigning) && !usages.includes(OID.anyExtendedKeyUsage)) {
      throw chainError(
        "certificate_extended_key_usage",
        ref,
        `${label(ref)} extendedKeyUsage does not include codeSigning (has: ${usages.join(", ")})`,
      );
    }
  }
}

/** `below` = how many intermediates sit between this CA and the leaf (for pathLenConstraint). */
function checkIssuerCa(cert: x509.X509Certificate, ref: CertificateRef, now: Date, below: number): void {
  checkValidity(cert, ref, now);
  const bc = cert.getExtension(x509.BasicConstraintsExtension);
  // A trust anchor may be an old v1 certificate without extensions; an intermediate must say it is a CA.
  if (bc ? !bc.ca : ref.role !== "root") {
    throw chainError(
      "certificate_not_ca",
      ref,
      `${label(ref)} issues certificates but is not a CA (basicConstraints cA is ${bc ? "false" : "absent"})`,
    );
  }
  if (bc?.pathLength !== undefined && below > bc.pathLength) {
    throw chainError(
      "certificate_path_length",
      ref,
      `${label(ref)} allows ${bc.pathLength} intermediate(s) below it, but the chain has ${below}`,
    );
  }
  const ku = cert.getExtension(x509.KeyUsagesExtension);
  if (ku && !(ku.usages & x509.KeyUsageFlags.keyCertSign)) {
    throw chainError(
      "certificate_key_usage",
      ref,
      `${label(ref)} keyUsage does not allow keyCertSign (has: ${keyUsageNames(ku.usages)})`,
    );
  }
  if (ref.role !== "root") checkCriticalExtensions(cert, ref);
}

function keyUsageNames(flags: number): string {
  const names = Object.entries(x509.KeyUsageFlags)
    .filter(([name, bit]) => typeof bit === "number" && isNaN(Number(name)) && flags & bit)
    .map(([name]) => name);
  return names.length ? names.join(", ") : "none";
}

export interface ValidatedChain {
  leaf: x509.X509Certificate;
  /** Leaf first, ending with the trusted root that anchors it. */
  path: CertificateInfo[];
}

/**
 * Validates the bundle's chain (`ders`, leaf first) up to one of `roots` at time `now`. Errors name the
 * certificate and the failed check.
 */
export async function validateChain(ders: Uint8Array[], roots: TrustedRoot[], now: Date): Promise<ValidatedChain> {
  const certs = ders.map((der, i) => parseCertificate(der, `x509CertificateChain.certificates[${i}]`));
  const leaf = certs[0];
  const leafRef: CertificateRef = { role: "leaf", index: 0, subject: leaf.subject };
  checkLeaf(leaf, leafRef, now);

  const path: { cert: x509.X509Certificate; role: CertificateInfo["role"] }[] = [{ cert: leaf, role: "leaf" }];
  const done = async () => ({ leaf, path: await Promise.all(path.map((p) => certificateInfo(p.cert, p.role))) });
  // A signing certificate that is itself trusted (a pinned self-signed certificate) needs no chain.
  const pinned = roots.find((r) => bytesEqual(r.der, ders[0]));
  if (pinned) {
    path.push({ cert: pinned.certificate, role: "root" });
    return await done();
  }

  const used = new Set<number>([0]);
  let current = leaf;
  let currentRef = leafRef;
  for (let depth = 0; depth < MAX_CHAIN_LENGTH; depth++) {
    const below = path.length - 1;
    const hash = (current.signatureAlgorithm as Algorithm & { hash?: { name: string } }).hash?.name;
    if (hash === "SHA-1") {
      // SHA-1 certificate signatures can be forged by chosen-prefix collisions; no CA should still issue them.
      throw chainError(
        "certificate_signature_invalid",
        currentRef,
        `${label(currentRef)} is signed with SHA-1, which is refused`,
      );
    }
    const rootCandidates = roots
      .map((r, index) => ({ r, index }))
      .filter(({ r }) => sameName(r.certificate.subjectName, current.issuerName));
    for (const { r, index } of rootCandidates) {
      if (await signedBy(current, r.certificate)) {
        const ref: CertificateRef = { role: "root", index, subject: r.certificate.subject };
        checkIssuerCa(r.certificate, ref, now, below);
        path.push({ cert: r.certificate, role: "root" });
        return await done();
      }
    }

    const bundleCandidates = certs
      .map((c, index) => ({ c, index }))
      .filter(({ c, index }) => !used.has(index) && sameName(c.subjectName, current.issuerName));
    let next: { c: x509.X509Certificate; index: number } | undefined;
    for (const candidate of bundleCandidates) {
      if (await signedBy(current, candidate.c)) {
        next = candidate;
        break;
      }
    }
    if (next) {
      const ref: CertificateRef = { role: "intermediate", index: next.index, subject: next.c.subject };
      checkIssuerCa(next.c, ref, now, below);
      used.add(next.index);
      path.push({ cert: next.c, role: "intermediate" });
      current = next.c;
      currentRef = ref;
      continue;
    }

    // No issuer found: say why as precisely as the material allows.
    if (sameName(current.subjectName, current.issuerName) && (await signedBy(current, current))) {
      throw chainError(
        "chain_untrusted",
        currentRef,
        `${label(currentRef)} is self-signed and not among the trusted roots: the signer is not under a trusted root`,
      );
    }
    if (rootCandidates.length > 0) {
      throw chainError(
        "chain_untrusted",
        currentRef,
        `${label(currentRef)} names trusted root "${current.issuer}" as its issuer, but its signature does not ` +
          `verify with that root's key: the signer is not under a trusted root`,
      );
    }
    if (bundleCandidates.length > 0) {
      throw chainError(
        "certificate_signature_invalid",
        currentRef,
        `${label(currentRef)}: signature does not verify with the key of its issuer "${current.issuer}" ` +
          `(bundle certificate #${bundleCandidates[0].index})`,
      );
    }
    throw chainError(
      "chain_incomplete",
      currentRef,
      `${label(currentRef)} was issued by "${current.issuer}", which is neither in the bundle's certificate ` +
        `chain nor among the trusted roots (is an intermediate certificate missing from the bundle?)`,
    );
  }
  throw chainError("chain_untrusted", currentRef, `certificate chain is longer than ${MAX_CHAIN_LENGTH} certificates`);
}

/** Loads trusted root certificates from PEM text(s); each text may hold several CERTIFICATE blocks. */
export function parseTrustedRoots(pems: string[]): TrustedRoot[] {
  return pems.flatMap((pem, i) => pemCertificates(pem, `trusted root PEM #${i}`));
}

/** The CERTIFICATE blocks of one PEM text, parsed; `where` names the text in errors. */
export function pemCertificates(pem: string, where: string): TrustedRoot[] {
  let blocks;
  try {
    blocks = pemBlocks(pem).filter((b) => b.label === "CERTIFICATE");
  } catch (error) {
    throw new OmsError("trust", "invalid_trust_material", `${where}: ${(error as Error).message}`);
  }
  if (blocks.length === 0) {
    throw new OmsError("trust", "invalid_trust_material", `${where}: holds no "CERTIFICATE" PEM block`);
  }
  return blocks.map((b, j) => {
    try {
      return { certificate: new x509.X509Certificate(toArrayBuffer(b.der)), der: b.der };
    } catch (error) {
      throw new OmsError(
        "trust",
        "invalid_trust_material",
        `${where}, certificate ${j}: not a valid X.509 certificate (${(error as Error).message})`,
      );
    }
  });
}
