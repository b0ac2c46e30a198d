// ffi/libc.ts reads struct shmid_ds at fixed offsets. This checks them against the C library's own
// headers on x86_64 and, where an aarch64 cross compiler and qemu-user are installed, on aarch64.

import assert from "node:assert/strict";
import { join } from "node:path";
import { SHMID_DS } from "../ffi/libc.ts";
import { NATTCH_OFFSET } from "./helpers/shm_segments.ts";

const PROGRAM = `#include <stdio.h>
#include <stddef.h>
#include <sys/shm.h>
int main(void) {
  printf("{\\"size\\":%zu,\\"modeOffset\\":%zu,\\"segszOffset\\":%zu,\\"ctimeOffset\\":%zu,\\"nattchOffset\\":%zu}\\n",
    sizeof(struct shmid_ds), offsetof(struct shmid_ds, shm_perm.mode),
    offsetof(struct shmid_ds, shm_segsz), offsetof(struct shmid_ds, shm_ctime), offsetof(struct shmid_ds, shm_nattch));
  return 0;
}
`;
const RUN_AARCH64 = new URL("../../shared/arm64/run-aarch64", import.meta.url).pathname;

async function available(command: string): Promise<boolean> {
  return await new Deno.Command(command, { args: ["--version"], stdout: "null", stderr: "null" }).output()
    .then((r) => r.success, () => false);
}

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

const haveCc = await available("cc");
if (!haveCc) console.log("skipping the x86_64 shmid_ds layout check: no C compiler (cc)");
const haveCross = await available("aarch64-linux-gnu-gcc") && await available("qemu-aarch64") &&
  await Deno.stat(RUN_AARCH64).then(() => true, () => false);
if (!haveCross) {
  console.log("skipping the aarch64 shmid_ds layout check: needs aarch64-linux-gnu-gcc, qemu-user and run-aarch64");
}

Deno.test({
  name: `struct shmid_ds offsets match glibc on ${Deno.build.arch}`,
  ignore: !haveCc,
  async fn() {
    assert.deepEqual(await layout("cc", []), { ...SHMID_DS, nattchOffset: NATTCH_OFFSET });
  },
});

Deno.test({
  name: "struct shmid_ds offsets match glibc on aarch64",
  ignore: !haveCross,
  async fn() {
    assert.deepEqual(await layout("aarch64-linux-gnu-gcc", [RUN_AARCH64]), {
      ...SHMID_DS,
      nattchOffset: NATTCH_OFFSET,
    });
  },
});
