// Errors that carry the gRPC status a client should see.

/** gRPC status codes (the numbers are fixed by the gRPC protocol). */
export enum Status {
  OK = 0,
  CANCELLED = 1,
  UNKNOWN = 2,
  INVALID_ARGUMENT = 3,
  DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5,
  ALREADY_EXISTS = 6,
  PERMISSION_DENIED = 7,
  RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9,
  ABORTED = 10,
  OUT_OF_RANGE = 11,
  UNIMPLEMENTED = 12,
  INTERNAL = 13,
  UNAVAILABLE = 14,
  DATA_LOSS = 15,
  UNAUTHENTICATED = 16,
}

/** A failure with the gRPC status code it maps to; its message goes to the client as is. */
export class AgentError extends Error {
  constructor(readonly code: Status, message: string) {
    super(message);
    this.name = "AgentError";
  }
}

export const invalidArgument = (message: string) => new AgentError(Status.INVALID_ARGUMENT, message);
export const notFound = (message: string) => new AgentError(Status.NOT_FOUND, message);
export const alreadyExists = (message: string) => new AgentError(Status.ALREADY_EXISTS, message);
export const failedPrecondition = (message: string) => new AgentError(Status.FAILED_PRECONDITION, message);
export const resourceExhausted = (message: string) => new AgentError(Status.RESOURCE_EXHAUSTED, message);
export const permissionDenied = (message: string) => new AgentError(Status.PERMISSION_DENIED, message);
export const unavailable = (message: string) => new AgentError(Status.UNAVAILABLE, message);

/** Why a call was given up before its end: its deadline passed, the client reset it, or its connection closed. */
export type CancelReason = "deadline" | "reset" | "disconnect";

const CANCEL_DETAILS: Record<CancelReason, string> = {
  deadline: "deadline exceeded",
  reset: "the client cancelled the call",
  disconnect: "the client's connection closed",
};

/** The reason a call's AbortSignal carries; a handler that stops early throws it. */
export class CallCancelled extends AgentError {
  constructor(readonly reason: CancelReason) {
    super(reason === "deadline" ? Status.DEADLINE_EXCEEDED : Status.CANCELLED, CANCEL_DETAILS[reason]);
    this.name = "CallCancelled";
  }
}

/** A start-up problem (configuration, socket, library): reported on stderr, exit code 2. */
export class StartupError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join("\n"));
    this.name = "StartupError";
  }
}
