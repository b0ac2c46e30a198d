// Whether an external tool a test needs is installed, so the test can skip with the reason.

/** True when `command --version` (or `args`) runs and succeeds; false when it is missing or fails. */
export async function installed(command: string, args = ["--version"]): Promise<boolean> {
  try {
    // Deno.Command throws synchronously when the program cannot be spawned at all.
    return (await new Deno.Command(command, { args, stdout: "null", stderr: "null" }).output()).success;
  } catch {
    return false;
  }
}
