// Logs: one JSON object per line on stderr. Debug lines only when verbose. Warnings and errors are
// rate-limited per message, so a client repeating a fault cannot flood the log (or the disk).

export type Fields = Record<string, unknown>;

export interface Logger {
  readonly verbose: boolean;
  debug(message: string, fields?: Fields): void;
  info(message: string, fields?: Fields): void;
  warn(message: string, fields?: Fields): void;
  error(message: string, fields?: Fields): void;
}

const encoder = new TextEncoder();

/** Lines of one warning or error message per window; past it they are counted and summarised. */
export const REPEATS_PER_WINDOW = 10;
export const REPEAT_WINDOW_MS = 10_000;

export function createLogger(
  verbose: boolean,
  write = (line: string) => Deno.stderr.writeSync(encoder.encode(line)),
  repeatWindowMs = REPEAT_WINDOW_MS,
): Logger {
  const emit = (level: string, message: string, fields: Fields = {}) =>
    write(JSON.stringify({ time: new Date().toISOString(), level, msg: message, ...fields }) + "\n");
  const limited = rateLimited(emit, repeatWindowMs);
  return {
    verbose,
    debug: (message, fields) => verbose && emit("debug", message, fields),
    info: (message, fields) => emit("info", message, fields),
    warn: (message, fields) => limited("warn", message, fields),
    error: (message, fields) => limited("error", message, fields),
  };
}

/**
 * At most REPEATS_PER_WINDOW lines per message and level in each window; the lines left out are
 * reported by one "suppressed" line when the window ends (from an unref'd timer: it never keeps the
 * process alive).
 */
function rateLimited(emit: (level: string, message: string, fields?: Fields) => void, windowMs: number) {
  const windows = new Map<string, { count: number; suppressed: number }>();
  return (level: string, message: string, fields?: Fields) => {
    const key = `${level}\0${message}`;
    let window = windows.get(key);
    if (!window) {
      const timer = setTimeout(() => {
        windows.delete(key);
        if (window!.suppressed > 0) {
          emit(level, "repeated log lines suppressed", { message, suppressed: window!.suppressed });
        }
      }, windowMs);
      Deno.unrefTimer(timer);
      window = { count: 0, suppressed: 0 };
      windows.set(key, window);
    }
    if (window.count++ < REPEATS_PER_WINDOW) emit(level, message, fields);
    else window.suppressed++;
  };
}
