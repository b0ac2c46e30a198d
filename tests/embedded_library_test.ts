// A compiled agent's ONNX Runtime: the executable embeds the library and build.ts bakes its digest
// into the entry; each start puts a verified copy into the state folder, or reuses the one there.
// `deno compile` needs Deno's runtime (denort), so these run extractLibrary and the generated entry
// on the real library, in this process and in subprocesses.

import assert from "node:assert/strict";
import { join } from "node:path";
import { readProfile, writeEntry } from "../build.ts";
import { digestFile, type FileDigest } from "../src/file_digest.ts";
import { extractLibrary, npmLibraryPath } from "../src/inference/runtime.ts";
import { OnnxRuntime } from "../ffi/onnxruntime.ts";
import { COMPILE_CONFIG, PROJECT_ROOT } from "./helpers/agent.ts";

const LIBRARY = npmLibraryPath();
const DIGEST = await digestFile(LIBRARY);
const RUNTIME = new URL("../src/inference/runtime.ts", import.meta.url).href;

/** Bytes this process has read through read(2) and its kind so far (/proc/self/io's rchar). */
async function bytesReadSoFar(): Promise<number> {
  return Number(/^rchar: (\d+)$/m.exec(await Deno.readTextFile("/proc/self/io"))![1]);
}

/** Waits until the clock has moved past `time`, so that a write now gives a file another mtime. */
async function clockPast(time: Date): Promise<void> {
  while (Date.now() <= time.getTime() + 1) await new Promise((resolve) => setTimeout(resolve, 2));
}

async function withState(fn: (state: string) => Promise<void>): Promise<void> {
  const state = await Deno.makeTempDir({ prefix: "edge-agent-library-" });
  try {
    await fn(state);
  } finally {
    await Deno.remove(state, { recursive: true });
  }
}

async function libFolder(state: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(join(state, "lib")))).map((e) => e.name).sort();
}

async function assertIsLibrary(path: string): Promise<void> {
  assert.deepEqual(await digestFile(path), DIGEST, `${path} holds the library's exact bytes`);
}

/** One start in a process of its own: extractLibrary as the agent runs it, with `digest` declared. */
async function startInProcess(state: string, digest: FileDigest, embedded = LIBRARY) {
  const code = `const runtime = await import(${JSON.stringify(RUNTIME)});
runtime.declareEmbeddedLibrary(${JSON.stringify(digest)});
console.log(await runtime.extractLibrary(${JSON.stringify(embedded)}, ${JSON.stringify(state)}));`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--config", COMPILE_CONFIG, code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    success: out.success,
    stdout: new TextDecoder().decode(out.stdout).trim(),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

Deno.test("the first start writes the library into the state folder; later starts reuse it without reading either file", async () => {
  await withState(async (state) => {
    const copy = await extractLibrary(LIBRARY, state, DIGEST);
    assert.match(copy, new RegExp(`^${state}/lib/libonnxruntime-${DIGEST.sha256.slice(0, 16)}\\.so\\.1$`));
    await assertIsLibrary(copy);
    const written = await Deno.stat(copy);
    const before = await bytesReadSoFar();
    assert.equal(await extractLibrary(LIBRARY, state, DIGEST), copy);
    const read = (await bytesReadSoFar()) - before;
    assert.ok(read < 2 ** 20, `a later start read ${read} bytes; the library has ${DIGEST.size}`);
    assert.equal((await Deno.stat(copy)).ino, written.ino, "the copy is not rewritten");
    assert.deepEqual(await libFolder(state), [basenameOf(copy), `${basenameOf(copy)}.verified`]);
    const ort = OnnxRuntime.open(copy);
    assert.match(ort.version, /^1\.\d+\.\d+$/);
    ort.close();
  });
});

function basenameOf(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

Deno.test("a copy changed in place at the same size, truncated, replaced or without its stamp is written afresh", async () => {
  await withState(async (state) => {
    const copy = await extractLibrary(LIBRARY, state, DIGEST);
    const damages: [string, () => Promise<void>][] = [
      ["bytes changed at the same size", async () => {
        const file = await Deno.open(copy, { write: true });
        await file.write(new Uint8Array(4096));
        file.close();
      }],
      ["truncated", () => Deno.truncate(copy, 1000)],
      ["replaced by another file of the same size and times", async () => {
        const { mtime, atime } = await Deno.stat(copy);
        const other = `${copy}.other`;
        await Deno.writeFile(other, new Uint8Array(DIGEST.size));
        await Deno.utime(other, atime!, mtime!);
        await Deno.rename(other, copy);
      }],
      ["without its stamp", () => Deno.remove(`${copy}.verified`)],
    ];
    for (const [damage, apply] of damages) {
      await clockPast((await Deno.stat(copy)).mtime!);
      await apply();
      assert.equal(await extractLibrary(LIBRARY, state, DIGEST), copy, damage);
      await assertIsLibrary(copy);
      // Verified again: the next start reads nothing.
      const before = await bytesReadSoFar();
      await extractLibrary(LIBRARY, state, DIGEST);
      assert.ok((await bytesReadSoFar()) - before < 2 ** 20, `${damage}: the fresh copy is trusted again`);
    }
  });
});

Deno.test("an embedded file that is not the library built in is refused, and leaves nothing at the copy's name", async () => {
  await withState(async (state) => {
    const damaged = join(state, "damaged.so");
    await Deno.copyFile(LIBRARY, damaged);
    const file = await Deno.open(damaged, { write: true });
    await file.write(new Uint8Array(16));
    file.close();
    await assert.rejects(
      extractLibrary(damaged, state, DIGEST),
      new RegExp(`damaged\\.so is not the library built in \\(${DIGEST.size} bytes, sha256 [0-9a-f]{64}; expected`),
    );
    assert.deepEqual(await libFolder(state), [], "no copy, no partial file");
  });
});

Deno.test("without a digest in the entry, the embedded file is hashed first and the copy is the same", async () => {
  await withState(async (state) => {
    const copy = await extractLibrary(LIBRARY, state);
    assert.equal(await extractLibrary(LIBRARY, state, DIGEST), copy, "the same name as with the digest");
    const before = await bytesReadSoFar();
    assert.equal(await extractLibrary(LIBRARY, state), copy);
    const read = (await bytesReadSoFar()) - before;
    assert.ok(
      read >= DIGEST.size && read < DIGEST.size + 2 ** 20,
      `read ${read}: the embedded file once, not the copy`,
    );
  });
});

Deno.test("concurrent starts on one state folder each get a whole verified copy and leave no partial file", async () => {
  await withState(async (state) => {
    const starts = await Promise.all([1, 2, 3].map(() => startInProcess(state, DIGEST)));
    for (const start of starts) assert.ok(start.success, start.stderr);
    const copy = starts[0].stdout;
    assert.deepEqual(starts.map((s) => s.stdout), [copy, copy, copy]);
    await assertIsLibrary(copy);
    assert.deepEqual(await libFolder(state), [basenameOf(copy), `${basenameOf(copy)}.verified`]);
  });
});

Deno.test("the generated entry declares the embedded library's digest, so a start refuses an embedded file that differs", async () => {
  await withState(async (state) => {
    const entry = join(state, "entry.ts");
    await writeEntry(await readProfile(join(PROJECT_ROOT, "deploy", "profile.json")), entry, DIGEST);
    const text = await Deno.readTextFile(entry);
    assert.ok(text.includes(`declareEmbeddedLibrary({"sha256":"${DIGEST.sha256}","size":${DIGEST.size}})`), text);
    const other = join(state, "other.so");
    await Deno.writeTextFile(other, "not the library");
    // The entry runs main.ts's command line ("help" prints the usage with the profile's socket), then
    // an extraction in the same process sees the digest the entry declared.
    const code = `await import(${JSON.stringify(new URL(`file://${entry}`).href)});
const runtime = await import(${JSON.stringify(RUNTIME)});
await runtime.extractLibrary(${JSON.stringify(other)}, ${JSON.stringify(state)}).then(
  (path) => console.log("extracted", path),
  (error) => console.log("refused:", error.message),
);`;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--config", COMPILE_CONFIG, code, "help"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.match(stdout, /default \/run\/edge-agent\/agent\.sock/);
    assert.match(stdout, /refused: \S+other\.so is not the library built in \(15 bytes/);
  });
});

Deno.test("a fresh copy removes earlier versions' copies and partial copies no start is still writing", async () => {
  await withState(async (state) => {
    const folder = join(state, "lib");
    await Deno.mkdir(folder);
    const earlier = ["libonnxruntime-0123456789abcdef.so.1", "libonnxruntime-0123456789abcdef.so.1.verified"];
    const abandoned = `libonnxruntime-${DIGEST.sha256.slice(0, 16)}.so.1.1234-abcdefgh.partial`;
    const beingWritten = `libonnxruntime-${DIGEST.sha256.slice(0, 16)}.so.1.5678-abcdefgh.partial`;
    const unrelated = "notes.txt";
    for (const name of [...earlier, abandoned, beingWritten, unrelated]) {
      await Deno.writeTextFile(join(folder, name), "x");
    }
    const anHourAgo = new Date(Date.now() - 3600_000);
    await Deno.utime(join(folder, abandoned), anHourAgo, anHourAgo);
    const copy = await extractLibrary(LIBRARY, state, DIGEST);
    assert.deepEqual(
      await libFolder(state),
      [basenameOf(copy), `${basenameOf(copy)}.verified`, beingWritten, unrelated].sort(),
    );
  });
});
