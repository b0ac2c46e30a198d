// Bundles this library writes validate against the spec's JSON schemas (bundle, and statement for the decoded
// payload), checked with a JSON-schema validator (ajv, Draft 2020-12) that the library itself does not use.

import assert from "node:assert/strict";
import { Ajv2020 } from "ajv/dist/2020.js";
import {
  generateDevelopmentKeyPair,
  generateDevelopmentTrust,
  type OmsBundleJson,
  type SerializationOptions,
  signModel,
} from "../src/packages/oms/mod.ts";

// The OMS spec's test vectors and schemas, kept in the repository (see testdata/oms/PROVENANCE.md).
const OMS_DIR = new URL("./testdata/oms", import.meta.url).pathname;

const SCHEMAS = `${OMS_DIR}/schemas/v1.0`;
const VECTORS = `${OMS_DIR}/test-vectors/v1.0`;

async function validators() {
  const ajv = new Ajv2020({ allErrors: true });
  for (const name of ["predicate", "statement", "envelope", "bundle"]) {
    ajv.addSchema(JSON.parse(await Deno.readTextFile(`${SCHEMAS}/${name}.schema.json`)));
  }
  const bundle = ajv.getSchema("https://model_signing/bundle/v1.0/schema")!;
  const statement = ajv.getSchema("https://model_signing/statement/v1.0/schema")!;
  return {
    /** Errors of a bundle and of its decoded statement, empty when both validate. */
    check(value: unknown): string[] {
      const errors: string[] = [];
      if (!bundle(value)) errors.push(`bundle: ${ajv.errorsText(bundle.errors)}`);
      const payload = (value as OmsBundleJson)?.dsseEnvelope?.payload;
      if (typeof payload === "string") {
        const decoded = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(payload), (c) => c.charCodeAt(0))));
        if (!statement(decoded)) errors.push(`statement: ${ajv.errorsText(statement.errors)}`);
      }
      return errors;
    },
  };
}

Deno.test("oms schema: the validator agrees with the spec's own test vectors", async () => {
  const v = await validators();
  for (const name of ["key", "certificate", "sigstore"]) {
    const bundle = JSON.parse(await Deno.readTextFile(`${VECTORS}/valid/${name}.bundle.json`));
    assert.deepEqual(v.check(bundle), [], `valid/${name}`);
  }
  for (const name of ["missing-envelope", "missing-tlog-entries", "missing-verification-material"]) {
    const bundle = JSON.parse(await Deno.readTextFile(`${VECTORS}/invalid/${name}.bundle.json`));
    assert.notDeepEqual(v.check(bundle), [], `invalid/${name}`);
  }
  const wrong = JSON.parse(await Deno.readTextFile(`${VECTORS}/invalid-payload/wrong-predicate.bundle.json`));
  assert.match(v.check(wrong).join("\n"), /^statement:/);
});

Deno.test("oms schema: produced bundles validate (key and certificate methods, files and shards)", async () => {
  const v = await validators();
  const dev = await generateDevelopmentTrust({ leafCurve: "P-384" });
  const keys = await generateDevelopmentKeyPair();
  const dir = await Deno.makeTempDir({ prefix: "oms_schema_" });
  await Deno.writeTextFile(`${dir}/config.json`, "{}");
  await Deno.mkdir(`${dir}/weights`);
  await Deno.writeFile(`${dir}/weights/part-0.bin`, new Uint8Array(3000).fill(7));
  const serializations: SerializationOptions[] = [
    {},
    { method: "shards", shardSize: 1024 },
    { hashType: "blake2b", ignorePaths: ["weights/part-1.bin"] },
    { method: "shards", hashType: "blake3", allowSymlinks: true },
  ];
  for (const serialization of serializations) {
    for (const certificate of [false, true]) {
      const signed = await signModel({
        modelPath: dir,
        privateKeyPem: certificate ? dev.leaf.privateKeyPem : keys.privateKeyPem,
        certificateChainPem: certificate ? dev.chainPem : undefined,
        serialization,
      });
      const written = JSON.parse(await Deno.readTextFile(signed.signaturePath));
      assert.deepEqual(v.check(written), [], `${JSON.stringify(serialization)} certificate=${certificate}`);
    }
  }
  await Deno.remove(dir, { recursive: true });
});
