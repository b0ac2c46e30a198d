// Package archive extraction: real archives (tar-stream's packer and the tar command), every rejection with
// its own reason, gzip bombs stopped early, corrupt input, and a state folder left exactly as it was on failure.

import assert from "node:assert/strict";
import { join } from "node:path";
import process from "node:process";
import { gzipSync } from "node:zlib";
import { pack } from "tar-stream";
import type { Header } from "tar-stream";
import {
  ArchiveError,
  type ArchiveErrorReason,
  type ArchiveLimits,
  DEFAULT_LIMITS,
  extractPackage,
} from "../src/packages/archive.ts";
import { cpuMs } from "./helpers/assertions.ts";

type TarEntry = { header: Partial<Header> & { name: string }; body?: string | Uint8Array };

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const umask = process.umask();

/** A work folder with `state/` (holding one earlier package) and `archives/` beside it. */
async function workspace(): Promise<{ root: string; state: string; archives: string }> {
  const root = await Deno.makeTempDir({ prefix: "archive_test_" });
  const state = join(root, "state");
  const archives = join(root, "archives");
  await Deno.mkdir(join(state, "models", "earlier"), { recursive: true });
  await Deno.writeTextFile(join(state, "models", "earlier", "model.onnx"), "earlier");
  await Deno.mkdir(archives);
  return { root, state, archives };
}

async function withWorkspace(fn: (w: { state: string; archives: string }) => Promise<void>) {
  const w = await workspace();
  try {
    await fn(w);
  } finally {
    await Deno.remove(w.root, { recursive: true });
  }
}

/** Every path under `dir` with its kind, sorted: what "nothing new" is checked against. */
async function snapshot(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(join(dir, prefix))) {
    const rel = prefix ? `${prefix}/${e.name}` : e.name;
    out.push(`${rel}${e.isDirectory ? "/" : e.isSymlink ? "@" : ""}`);
    if (e.isDirectory) out.push(...await snapshot(dir, rel));
  }
  return out.sort();
}

async function tarBytes(entries: TarEntry[]): Promise<Uint8Array> {
  const p = pack();
  const chunks: Uint8Array[] = [];
  const collected = (async () => {
    for await (const chunk of p) chunks.push(chunk as Uint8Array);
  })();
  for (const { header, body } of entries) {
    await new Promise<void>((resolve, reject) => {
      const done = (error?: Error | null) => error ? reject(error) : resolve();
      if (body === undefined) p.entry(header, done);
      else p.entry(header, body, done);
    });
  }
  p.finalize();
  await collected;
  return concat(chunks);
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.byteLength;
  }
  return out;
}

async function tgz(archives: string, name: string, entries: TarEntry[]): Promise<string> {
  const path = join(archives, name);
  await Deno.writeFile(path, gzipSync(await tarBytes(entries)));
  return path;
}

async function run(cmd: string, args: string[]): Promise<void> {
  const out = await new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).output();
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
}

/** Extraction must fail with `reason`, name the entry, and leave the state folder as it was. */
async function rejects(
  state: string,
  archive: string,
  reason: ArchiveErrorReason,
  mentions: string,
  limits?: Partial<ArchiveLimits>,
): Promise<ArchiveError> {
  const before = await snapshot(state);
  let caught: unknown;
  try {
    await extractPackage(archive, { stateDir: state, destination: "models/new", limits });
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof ArchiveError, `expected an ArchiveError, got ${caught}`);
  assert.equal(caught.reason, reason, caught.message);
  assert.ok(caught.message.includes(mentions), `${JSON.stringify(caught.message)} should mention ${mentions}`);
  assert.deepEqual(await snapshot(state), before, "the state folder changed");
  return caught;
}

function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(out.subarray(i, Math.min(n, i + 65536)));
  return out;
}

const file = (name: string, body: string | Uint8Array = "x"): TarEntry => ({ header: { name }, body });
const dir = (name: string): TarEntry => ({ header: { name, type: "directory" } });

Deno.test("a package made by the tar command extracts exactly, with our modes, by one rename", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const src = join(archives, "src");
    const model = randomBytes(64 * 1024);
    const big = randomBytes(3 * MiB);
    await Deno.mkdir(join(src, "weights", "deep"), { recursive: true, mode: 0o700 });
    await Deno.writeFile(join(src, "model.onnx"), model, { mode: 0o600 });
    await Deno.writeFile(join(src, "weights", "deep", "big.bin"), big, { mode: 0o777 });
    const small = {
      "model.sig": "signature",
      "edge-model.json": JSON.stringify({ name: "m", version: "1" }),
      "weights/..not-a-parent": "dots are fine inside a name",
    };
    for (const [name, text] of Object.entries(small)) await Deno.writeTextFile(join(src, name), text);
    await Deno.writeFile(join(src, "empty"), new Uint8Array());
    await Deno.chmod(join(src, "weights", "deep", "big.bin"), 0o777);
    await Deno.chmod(join(src, "weights", "deep"), 0o700);
    const archive = join(archives, "pkg.tar.gz");
    await run("tar", ["-czf", archive, "-C", src, "."]);

    const before = await snapshot(state);
    const result = await extractPackage(archive, { stateDir: state, destination: "models/m/1" });
    assert.equal(result.path, join(await Deno.realPath(state), "models", "m", "1"));
    assert.equal(result.files, 6);
    assert.equal(result.bytes, model.length + big.length + Object.values(small).join("").length);
    assert.deepEqual(await snapshot(result.path), await snapshot(src));
    assert.deepEqual(await Deno.readFile(join(result.path, "model.onnx")), model);
    assert.deepEqual(await Deno.readFile(join(result.path, "weights", "deep", "big.bin")), big);
    assert.equal(await Deno.readTextFile(join(result.path, "model.sig")), "signature");
    for (const f of ["model.onnx", "weights/deep/big.bin", "empty"]) {
      assert.equal((await Deno.stat(join(result.path, f))).mode! & 0o777, 0o644 & ~umask, f);
    }
    for (const d of ["", "weights", "weights/deep"]) {
      assert.equal((await Deno.stat(join(result.path, d))).mode! & 0o777, 0o755 & ~umask, d || "root");
    }
    // Only the new package: no staging/ left behind.
    const added = (await snapshot(state)).filter((p) => !before.includes(p));
    assert.ok(added.every((p) => p.startsWith("models/m/")), added.join(", "));
  });
});

Deno.test("GNU and PAX long names extract when they stay inside", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const src = join(archives, "src");
    const long = "d".repeat(120) + "/" + "e".repeat(150);
    await Deno.mkdir(join(src, long), { recursive: true });
    await Deno.writeTextFile(join(src, long, "f".repeat(200)), "deep");
    for (const format of ["gnu", "pax"]) {
      const archive = join(archives, `${format}.tgz`);
      await run("tar", [`--format=${format}`, "-czf", archive, "-C", src, "."]);
      const result = await extractPackage(archive, { stateDir: state, destination: `models/${format}` });
      assert.equal(await Deno.readTextFile(join(result.path, long, "f".repeat(200))), "deep");
    }
  });
});

Deno.test("an archive of many tiny files is not mistaken for a bomb", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const entries = Array.from({ length: 1000 }, (_, i) => file(`f${i}`, ""));
    const archive = await tgz(archives, "tiny.tgz", entries);
    const result = await extractPackage(archive, { stateDir: state, destination: "models/tiny" });
    assert.equal(result.files, 1000);
  });
});

Deno.test("links, devices, fifos and other types are refused, naming the entry", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const cases: [TarEntry, ArchiveErrorReason, string][] = [
      [{ header: { name: "evil", type: "symlink", linkname: "/etc/passwd" } }, "symlink", '"evil" is a symlink'],
      [{ header: { name: "hard", type: "link", linkname: "model.onnx" } }, "hardlink", '"hard" is a hard link'],
      [
        { header: { name: "null", type: "character-device", devmajor: 1, devminor: 3 } },
        "device",
        '"null" is a character-device',
      ],
      [{ header: { name: "sda", type: "block-device", devmajor: 8 } }, "device", '"sda" is a block-device'],
      [{ header: { name: "pipe", type: "fifo" } }, "fifo", '"pipe" is a fifo'],
      [{ header: { name: "contig", type: "contiguous-file" }, body: "x" }, "unsupported-type", '"contig"'],
    ];
    for (const [entry, reason, mentions] of cases) {
      // A good file first, so that something was already written when the bad entry comes.
      const archive = await tgz(archives, `${reason}.tgz`, [file("model.onnx", "m"), entry]);
      await rejects(state, archive, reason, mentions);
    }
  });
});

Deno.test("a symlink archived by the tar command is refused", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const src = join(archives, "src");
    await Deno.mkdir(src);
    await Deno.writeTextFile(join(src, "model.onnx"), "m");
    await Deno.symlink("/etc/passwd", join(src, "model.sig"));
    const archive = join(archives, "link.tgz");
    await run("tar", ["-czf", archive, "-C", src, "."]);
    const error = await rejects(state, archive, "symlink", '"./model.sig" is a symlink -> "/etc/passwd"');
    assert.equal(error.entry, '"./model.sig"');
  });
});

Deno.test("names that are absolute, climb, or are malformed are refused, PAX and GNU long names too", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const pax = (name: string): TarEntry => ({ header: { name, pax: {} }, body: "x" }); // forces a PAX path
    const cases: [TarEntry, ArchiveErrorReason, string][] = [
      [file("/etc/cron.d/evil"), "absolute-path", '"/etc/cron.d/evil" is an absolute path'],
      [file("../evil"), "parent-segment", '"../evil" has a .. segment'],
      [file("a/../../evil"), "parent-segment", '"a/../../evil"'],
      [file("a/b/../c"), "parent-segment", '"a/b/../c"'], // would stay inside, but no .. at all is the rule
      [dir("../up/"), "parent-segment", '"../up/"'],
      [pax("../pax-evil"), "parent-segment", '"../pax-evil"'],
      [pax("/pax/absolute"), "absolute-path", '"/pax/absolute"'],
      [pax("x".repeat(300) + "/../../../evil"), "parent-segment", "xxxx"],
      [file("bad\nname"), "bad-name", "control character"],
      [file("..\\..\\evil"), "bad-name", "backslash"],
      [pax("y".repeat(256)), "bad-name", "over 255 bytes"],
      [file("."), "bad-name", '"." names the root'],
    ];
    for (const [i, [entry, reason, mentions]] of cases.entries()) {
      const archive = await tgz(archives, `name${i}.tgz`, [file("model.onnx", "m"), entry]);
      await rejects(state, archive, reason, mentions);
    }

    // The tar command's own long-name headers, climbing out.
    const src = join(archives, "src");
    await Deno.mkdir(src);
    await Deno.writeTextFile(join(src, "f"), "x");
    const climb = "d".repeat(120) + "/../../../";
    for (const format of ["gnu", "pax"]) {
      const archive = join(archives, `long-${format}.tgz`);
      await run("tar", ["-P", `--format=${format}`, `--transform=s,^,${climb},`, "-czf", archive, "-C", src, "f"]);
      await rejects(state, archive, "parent-segment", `${climb}f`);
    }
  });
});

Deno.test("duplicate entries and file/folder clashes are refused", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const cases: [TarEntry[], ArchiveErrorReason, string][] = [
      [[file("model.onnx"), file("model.onnx")], "duplicate", '"model.onnx" appears more than once'],
      [[file("model.onnx"), file("./model.onnx")], "duplicate", 'entry "./model.onnx": "model.onnx" appears'],
      [[file("a//b"), file("a/./b")], "duplicate", '"a/b" appears more than once'],
      [[dir("w/"), dir("./w")], "duplicate", '"w" appears more than once'],
      [[file("a"), dir("a/")], "duplicate", '"a" appears more than once'],
      [[file("a"), file("a/b")], "conflict", '"a" is a file in this archive'],
      [[file("a/b"), file("a")], "conflict", '"a" is a folder of earlier entries'],
    ];
    for (const [i, [entries, reason, mentions]] of cases.entries()) {
      await rejects(state, await tgz(archives, `dup${i}.tgz`, entries), reason, mentions);
    }
    // A folder named after files inside it were listed is fine, as `tar` may order them.
    const ok = await tgz(archives, "late-dir.tgz", [file("w/x"), dir("w/")]);
    assert.equal((await extractPackage(ok, { stateDir: state, destination: "models/ok" })).files, 1);
  });
});

Deno.test("entry, file and total limits are enforced from the headers", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const five = await tgz(archives, "five.tgz", ["a", "b", "c", "d", "e"].map((n) => file(n, randomBytes(MiB))));
    await rejects(state, five, "too-many-entries", 'entry "d": archive has more than 3 entries', { entries: 3 });
    await rejects(state, five, "file-too-large", `entry "a": ${MiB} bytes, over ${MiB - 1}`, { fileBytes: MiB - 1 });
    // Checked at "c"'s header, before its body: 2 MiB and a bit have come out of gunzip by then.
    const totalBytes = 2.5 * MiB;
    await rejects(state, five, "total-too-large", `entry "c": files add up to more than ${totalBytes}`, { totalBytes });
    // The stream itself counts headers and padding too.
    await rejects(state, five, "total-too-large", "archive unpacks to more than", { totalBytes: 5 * MiB });
    const ok = await extractPackage(five, {
      stateDir: state,
      destination: "models/five",
      limits: { entries: 5, fileBytes: MiB, totalBytes: 5 * MiB + 8192 },
    });
    assert.deepEqual([ok.files, ok.bytes], [5, 5 * MiB]);
    await assert.rejects(extractPackage(five, { stateDir: state, destination: "x", limits: { ratio: 0 } }), RangeError);
  });
});

/** gzip members may be concatenated: 64 members of 16 MiB of zeros make 1 GiB from ~1 MB, without 1 GiB in memory. */
async function zeroBomb(path: string, before: Uint8Array | null, zeroes: number, after: Uint8Array | null) {
  const member = gzipSync(new Uint8Array(16 * MiB), { level: 9 });
  const out = await Deno.open(path, { write: true, createNew: true });
  try {
    if (before) await writeAll(out, gzipSync(before));
    for (let i = 0; i < zeroes / (16 * MiB); i++) await writeAll(out, member);
    if (after) await writeAll(out, gzipSync(after));
  } finally {
    out.close();
  }
  return (await Deno.stat(path)).size;
}

async function writeAll(out: Deno.FsFile, bytes: Uint8Array) {
  for (let off = 0; off < bytes.length;) off += await out.write(bytes.subarray(off));
}

/** The packer's 512-byte header for an entry, without its body. */
async function tarHeader(header: Partial<Header> & { name: string }): Promise<Uint8Array> {
  const p = pack();
  p.on("error", () => {});
  p.entry(header).on("error", () => {});
  const first = await p[Symbol.asyncIterator]().next();
  p.destroy();
  return first.value as Uint8Array;
}

Deno.test("a gzip bomb of zeros is stopped quickly by the ratio limit, or by the size limit", async () => {
  await withWorkspace(async ({ state, archives }) => {
    // Zeros alone read as an endless run of empty tar blocks: only the byte limits can stop them.
    const plain = join(archives, "zeros.gz");
    const size = await zeroBomb(plain, null, GiB, null);
    assert.ok(size < 2 * MiB, `bomb is ${size} bytes`);
    // Quickly: in CPU time, which a loaded machine does not stretch.
    let start = cpuMs();
    await rejects(state, plain, "ratio-too-high", "expands more than 100x");
    assert.ok(cpuMs() - start < 3000, `ratio stop took ${cpuMs() - start} ms of CPU`);
    start = cpuMs();
    await rejects(state, plain, "total-too-large", "more than 67108864 bytes", {
      ratio: Infinity,
      totalBytes: 64 * MiB,
    });
    assert.ok(cpuMs() - start < 5000, `size stop took ${cpuMs() - start} ms of CPU`);

    // One 1 GiB file of zeros inside a real tar.
    const inFile = join(archives, "file-bomb.tgz");
    await zeroBomb(inFile, await tarHeader({ name: "model.onnx", size: GiB }), GiB, new Uint8Array(1024));
    start = cpuMs();
    const error = await rejects(state, inFile, "ratio-too-high", "expands more than 100x");
    assert.ok(cpuMs() - start < 3000, `ratio stop took ${cpuMs() - start} ms of CPU`);
    const out = Number(/\((\d+) bytes from/.exec(error.message)![1]);
    assert.ok(out < 16 * MiB, `${out} bytes came out before the stop`);
    const noRatio = { ratio: Infinity };
    await rejects(state, inFile, "file-too-large", `"model.onnx": ${GiB} bytes`, { ...noRatio, fileBytes: 64 * MiB });
    await rejects(state, inFile, "total-too-large", '"model.onnx"', { ...noRatio, totalBytes: 64 * MiB });
    assert.equal(DEFAULT_LIMITS.ratio, 100);
  });
});

Deno.test("truncated, corrupt and non-archive input is refused as corrupt", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const random = randomBytes(256 * 1024);
    const good = gzipSync(await tarBytes([file("model.onnx", random), file("model.sig", "sig")]));
    const write = async (name: string, bytes: Uint8Array) => {
      await Deno.writeFile(join(archives, name), bytes);
      return join(archives, name);
    };
    await rejects(state, await write("cut.tgz", good.subarray(0, good.length >> 1)), "corrupt", "unexpected end");
    const flipped = good.slice();
    for (let i = 1000; i < 1100; i++) flipped[i] ^= 0xff;
    await rejects(state, await write("flipped.tgz", flipped), "corrupt", "corrupt archive");
    const crc = good.slice();
    crc[crc.length - 6] ^= 0xff; // the gzip trailer's CRC-32
    await rejects(state, await write("crc.tgz", crc), "corrupt", "corrupt archive");
    await rejects(state, await write("plain.tar", await tarBytes([file("a")])), "corrupt", "corrupt archive");
    await rejects(state, await write("junk.tgz", gzipSync(random)), "corrupt", "Invalid tar header");
    const tar = await tarBytes([file("model.onnx", random)]);
    await rejects(state, await write("short-tar.tgz", gzipSync(tar.subarray(0, 10000))), "corrupt", "Unexpected end");
    await rejects(state, await write("empty.tgz", new Uint8Array()), "corrupt", "corrupt archive");
    await rejects(state, join(archives, "missing.tgz"), "io", "missing.tgz");
  });
});

Deno.test("the destination must be new and inside the state folder; staging/ must be a plain folder", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const archive = await tgz(archives, "ok.tgz", [file("model.onnx", "m")]);
    const refused = async (destination: string, mentions: string) => {
      const before = await snapshot(state);
      await assert.rejects(extractPackage(archive, { stateDir: state, destination }), (error) => {
        assert.ok(error instanceof ArchiveError && error.reason === "destination", String(error));
        assert.ok(error.message.includes(mentions), error.message);
        return true;
      });
      assert.deepEqual(await snapshot(state), before);
    };
    await refused("../outside", "must be a folder inside");
    await refused(join(archives, "elsewhere"), "must be a folder inside");
    await refused(".", "must be a folder inside");
    await refused("staging/x", "not staging/");
    await refused("models/earlier", "already exists");
    await Deno.symlink(archives, join(state, "escape"));
    await refused("escape/pkg", "leads outside");
    await Deno.remove(join(state, "escape"));
    await Deno.symlink(archives, join(state, "staging"));
    await refused("models/new", "is not a plain folder");
    assert.deepEqual(await snapshot(archives), ["ok.tgz"]);
    await Deno.remove(join(state, "staging"));

    // Parents of the destination are made, and a failed publish removes them again.
    const result = await extractPackage(archive, { stateDir: state, destination: "a/b/c" });
    assert.equal(await Deno.readTextFile(join(result.path, "model.onnx")), "m");
  });
});

Deno.test("concurrent extractions each publish their own folder and leave no staging behind", async () => {
  await withWorkspace(async ({ state, archives }) => {
    const archive = await tgz(archives, "ok.tgz", [file("model.onnx", "m"), file("model.sig", "s")]);
    const results = await Promise.all(
      Array.from({ length: 6 }, (_, i) => extractPackage(archive, { stateDir: state, destination: `models/c${i}` })),
    );
    assert.deepEqual(results.map((r) => r.files), [2, 2, 2, 2, 2, 2]);
    assert.ok(!(await snapshot(state)).some((p) => p.startsWith("staging")));
  });
});
