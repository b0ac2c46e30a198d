// Logs: one JSON object per line on stderr. Debug lines only when verbose.

export type Fields = Record<string, unknown>;

export interface Logger {
  readonly verbose: boolean;
  debug(message: string, fields?: Fields): void;
  info(message: string, fields?: Fields): void;
  warn(message: string, fields?: Fields): void;
  error(message: string, fields?: Fields): void;
}

const encoder = new TextEncoder();

export function createLogger(
  verbose: boolean,
  write = (line: string) => Deno.stderr.writeSync(encoder.encode(line)),
): Logger {
  const emit = (level: string, message: string, fields: Fields = {}) =>
    write(JSON.stringify({ time: new Date().toISOString(), level, msg: message, ...fields }) + "\n");
  return {
    verbose,
    debug: (message, fields) => verbose && emit("debug", message, fields),
    info: (message, fields) => emit("info", message, fields),
    warn: (message, fields) => emit("warn", message, fields),
    error: (message, fields) => emit("error", message, fields),
  };
}
