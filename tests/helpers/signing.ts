// Signed model packages for the tests: one development trust per test process (root, intermediate,
// code-signing leaf), its root written where the agents under test are told to trust it.

import { join } from "node:path";
import { type DevelopmentTrust, generateDevelopmentTrust, signModel } from "../../src/packages/oms/mod.ts";

export interface TestTrust extends DevelopmentTrust {
  /** A PEM file holding the root, for sagemaker_edge_core_root_certs_path. */
  rootFile: string;
}

let shared: Promise<TestTrust> | null = null;

/** The process-wide development trust, made on first use. */
export function testTrust(): Promise<TestTrust> {
  shared ??= (async () => {
    const trust = await generateDevelopmentTrust();
    const dir = await Deno.makeTempDir({ prefix: "edge-agent-trust-" });
    const rootFile = join(dir, "root.pem");
    await Deno.writeTextFile(rootFile, trust.root.certificatePem);
    return { ...trust, rootFile };
  })();
  return shared;
}

/** Signs a model folder (or single file) with the test trust's leaf: writes model.sig (or <file>.sig). */
export async function signPackage(path: string): Promise<void> {
  const trust = await testTrust();
  await signModel({ modelPath: path, privateKeyPem: trust.leaf.privateKeyPem, certificateChainPem: trust.chainPem });
}
