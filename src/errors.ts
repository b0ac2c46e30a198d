// Errors that carry the gRPC status a client should see.

import { status } from "@grpc/grpc-js";

export { status as Status };

/** A failure with the gRPC status code it maps to; its message goes to the client as is. */
export class AgentError extends Error {
  constructor(readonly code: status, message: string) {
    super(message);
    this.name = "AgentError";
  }
}

export const invalidArgument = (message: string) => new AgentError(status.INVALID_ARGUMENT, message);
export const notFound = (message: string) => new AgentError(status.NOT_FOUND, message);
export const alreadyExists = (message: string) => new AgentError(status.ALREADY_EXISTS, message);
export const failedPrecondition = (message: string) => new AgentError(status.FAILED_PRECONDITION, message);
export const resourceExhausted = (message: string) => new AgentError(status.RESOURCE_EXHAUSTED, message);
export const permissionDenied = (message: string) => new AgentError(status.PERMISSION_DENIED, message);
export const unavailable = (message: string) => new AgentError(status.UNAVAILABLE, message);

/** A start-up problem (configuration, socket, library): reported on stderr, exit code 2. */
export class StartupError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join("\n"));
    this.name = "StartupError";
  }
}
