// Model-side rules: path canonicalization (spec 6.1.2), exclusions (6.2.1), hashing (6.3), root digest (6.5).

import assert from "node:assert/strict";
import { compareCodePoints } from "../src/packages/oms/encoding.ts";
import { createHasher, hashFileRanges, rangesFor } from "../src/packages/oms/hashing.ts";
import { enumerateModel, rootDigest } from "../src/packages/oms/manifest.ts";
import {
  canonicalIgnorePath,
  canonicalizeRelativePath,
  parseShardName,
  PathFilter,
} from "../src/packages/oms/paths.ts";
import { OmsError, type ResourceDescriptor } from "../src/packages/oms/mod.ts";

Deno.test("oms paths: canonicalization collapses ./ and // and refuses absolute and .. paths", () => {
  assert.equal(canonicalizeRelativePath("./config.json"), "config.json");
  assert.equal(canonicalizeRelativePath("subdir/./weights.bin"), "subdir/weights.bin");
  assert.equal(canonicalizeRelativePath("subdir//file/"), "subdir/file");
  assert.equal(canonicalizeRelativePath("Model.bin"), "Model.bin");
  assert.match(String(canonicalizeRelativePath("/etc/passwd")), /absolute/);
  assert.match(String(canonicalizeRelativePath("a/../b")), /`\.\.`/);
  assert.match(String(canonicalizeRelativePath("./")), /model root itself/);
  assert.match(String(canonicalIgnorePath("weights/*.bin")), /glob/);
  assert.match(String(canonicalIgnorePath("file[1]")), /glob/);
});

Deno.test("oms paths: defaults match top-level components only, user paths exact with their subtree", () => {
  const filter = new PathFilter(["cache", "sub/tmp"], ["model.sig"]);
  for (
    const excluded of [
      ".git/HEAD",
      ".github",
      ".gitignore",
      ".gitattributes",
      "cache",
      "cache/x",
      "sub/tmp/y",
      "model.sig",
    ]
  ) {
    assert.notEqual(filter.excludedBy(excluded), null, excluded);
  }
  for (
    const kept of ["sub/.git", "sub/.gitignore", "cachefile", "sub/cache", "sub/tmpfile", "x/model.sig", ".gitkeep"]
  ) {
    assert.equal(filter.excludedBy(kept), null, kept);
  }
});

Deno.test("oms paths: shard names keep colons in the path", () => {
  assert.deepEqual(parseShardName("a:b:c.bin:10:20"), { path: "a:b:c.bin", start: 10, end: 20 });
  assert.match(String(parseShardName("a.bin:10")), /<path>:<start>:<end>/);
  assert.match(String(parseShardName("a.bin:01:20")), /<path>:<start>:<end>/);
  assert.match(String(parseShardName("a.bin:20:20")), /not after its start/);
});

Deno.test("oms paths: resources sort by code point, not UTF-16 unit", () => {
  const names = ["\u{1F600}.bin", "\uFFFD.bin", "b", "a/b", "a.txt", "B"];
  assert.deepEqual([...names].sort(compareCodePoints), ["B", "a.txt", "a/b", "b", "\uFFFD.bin", "\u{1F600}.bin"]);
});

Deno.test("oms hashing: registry algorithms give their standard digests", () => {
  const abc = new TextEncoder().encode("abc");
  const digest = (type: "sha256" | "blake2b" | "blake3") => {
    const h = createHasher(type);
    h.update(abc.subarray(0, 1));
    h.update(abc.subarray(1));
    return h.digestHex();
  };
  assert.equal(digest("sha256"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  assert.equal(
    digest("blake2b"),
    "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d17d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923",
  );
  assert.equal(digest("blake3"), "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
});

Deno.test("oms hashing: byte ranges of a file hash like the bytes they cover", async () => {
  const dir = await Deno.makeTempDir({ prefix: "oms_hash_" });
  const data = new Uint8Array(3_500_000).map((_, i) => (i * 31) & 0xff);
  await Deno.writeFile(`${dir}/f.bin`, data);
  const ranges = rangesFor(data.length, 1_000_000);
  assert.deepEqual(ranges.map((r) => r.end - r.start), [1_000_000, 1_000_000, 1_000_000, 500_000]);
  const digests = await hashFileRanges(`${dir}/f.bin`, ranges, "sha256", "f.bin");
  for (const [i, r] of ranges.entries()) {
    const expected = new Uint8Array(await crypto.subtle.digest("SHA-256", data.slice(r.start, r.end)));
    assert.equal(digests[i], Array.from(expected, (b) => b.toString(16).padStart(2, "0")).join(""));
  }
  assert.deepEqual(rangesFor(0, 10), []);
  assert.deepEqual(rangesFor(0), [{ start: 0, end: 0 }]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("oms manifest: root digest of the spec's test vector resources", () => {
  const resources: ResourceDescriptor[] = [
    {
      name: "signme-1",
      algorithm: "sha256",
      digest: "bc9a717db6064a32cbe9eae6fc40651dd6d36ef1757183f590eff2b1765d7ebc",
    },
    {
      name: "signme-2",
      algorithm: "sha256",
      digest: "32dcb1f8e1ae52d5963e56a6ba06ab58b424c15ed2a6b70d2feca1d089370028",
    },
  ];
  assert.equal(rootDigest(resources), "92745110b1ab4368471cbe31664e10174e954b113a3df333db860317b2c6dec4");
});

Deno.test("oms manifest: special files and undecodable names are refused, naming the file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "oms_enum_" });
  await Deno.writeTextFile(`${dir}/ok.bin`, "x");
  const listed = await enumerateModel(dir, { allowSymlinks: false, ignorePaths: [] });
  assert.deepEqual(listed.files.map((f) => [f.name, f.size]), [["ok.bin", 1]]);

  await new Deno.Command("mkfifo", { args: [`${dir}/pipe`] }).output();
  await assert.rejects(
    enumerateModel(dir, { allowSymlinks: false, ignorePaths: [] }),
    (e: OmsError) => e.code === "unsupported_file_type" && e.file === "pipe",
  );
  // Excluded paths are skipped before they are looked at.
  await enumerateModel(dir, { allowSymlinks: false, ignorePaths: ["pipe"] });
  await Deno.remove(`${dir}/pipe`);

  await new Deno.Command("bash", { args: ["-c", `touch "$1"$'\\xff'.bin`, "bash", `${dir}/bad`] }).output();
  await assert.rejects(
    enumerateModel(dir, { allowSymlinks: false, ignorePaths: [] }),
    (e: OmsError) => e.code === "invalid_path" && /not valid UTF-8/.test(e.message),
  );
  await Deno.remove(dir, { recursive: true });
});
