// ffi/libc.ts reads struct shmid_ds at fixed offsets. This checks them against the C library's own
// headers on x86_64 and, where an aarch64 cross compiler and qemu-user are installed, on aarch64.

import assert from "node:assert/strict";
import { join } from "node:path";
import { SHMID_DS } from "../ffi/libc.ts";
import { NATTCH_OFFSET } from "./helpers/shm_segments.ts";
import { installed } from "./helpers/tools.ts";

const PROGRAM = `#include <stdio.h>
#include <stddef.h>
#include <sys/shm.h>
int main(void) {
  printf("{\\"size\\":%zu,\\"uidOffset\\":%zu,\\"gidOffset\\":%zu,\\"modeOffset\\":%zu,\\"segszOffset\\":%zu,\\"ctimeOffset\\":%zu,\\"nattchOffset\\":%zu}\\n",
    sizeof(struct shmid_ds), offsetof(struct shmid_ds, shm_perm.uid), offsetof(struct shmid_ds, shm_perm.gid),
    offsetof(struct shmid_ds, shm_perm.mode),
    offsetof(struct shmid_ds, shm_segsz), offsetof(struct shmid_ds, shm_ctime), offsetof(struct shmid_ds, shm_nattch));
  return 0;
}
`;
const RUN_AARCH64 = new URL("./arm64/run-aarch64", import.meta.url).pathname;

async function layout(compiler: string, runner: string[]): Promise<unknown> {
  const dir = await Deno.makeTempDir({ prefix: "edge-agent-layout-" });
  try {
    await Deno.writeTextFile(join(dir, "layout.c"), PROGRAM);
    const binary = join(dir, "layout");
    const built = await new Deno.Command(compiler, { args: ["-o", binary, join(dir, "layout.c")] }).output();
    assert.ok(built.success, new TextDecoder().decode(built.stderr));
    const [command, ...args] = [...runner, binary];
    const ran = await new Deno.Command(command, { args }).output();
    assert.ok(ran.success, new TextDecoder().decode(ran.stderr));
    return JSON.parse(new TextDecoder().decode(ran.stdout));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const haveCc = await installed("cc");
if (!haveCc) console.log("skipping the x86_64 shmid_ds layout check: no C compiler (cc)");
/** Why the aarch64 check cannot run here, or null. */
async function crossMissing(): Promise<string | null> {
  if (!await installed("aarch64-linux-gnu-gcc")) {
    return "aarch64-linux-gnu-gcc is not installed (gcc-aarch64-linux-gnu)";
  }
  if (!await installed("qemu-aarch64")) return "qemu-aarch64 is not installed (qemu-user)";
  if (Deno.uid() !== 0) return "tests/arm64/run-aarch64 needs root (a private mount namespace)";
  return null;
}
const crossSkip = await crossMissing();
if (crossSkip) console.log(`skipping the aarch64 shmid_ds layout check: ${crossSkip}`);

Deno.test({
  name: `struct shmid_ds offsets match glibc on ${Deno.build.arch}`,
  ignore: !haveCc,
  async fn() {
    assert.deepEqual(await layout("cc", []), { ...SHMID_DS, nattchOffset: NATTCH_OFFSET });
  },
});

Deno.test({
  name: "struct shmid_ds offsets match glibc on aarch64",
  ignore: crossSkip !== null,
  async fn() {
    assert.deepEqual(await layout("aarch64-linux-gnu-gcc", [RUN_AARCH64]), {
      ...SHMID_DS,
      nattchOffset: NATTCH_OFFSET,
    });
  },
});
