// `deno task trust|package|client ...`: the command line of main.ts, with relative paths taken from
// the folder the task was started in. deno task runs in the project root and names the caller's
// folder in INIT_CWD; `trust init --out ./trust` from a subfolder writes there, as one expects.

import { main } from "../main.ts";

const from = Deno.env.get("INIT_CWD");
if (from) Deno.chdir(from);
await main(Deno.args);
