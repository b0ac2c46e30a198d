// A grpc-js client of grpc.health.v1 Watch, for the tests that follow health changes.

import * as grpc from "@grpc/grpc-js";
import type { Buffer } from "node:buffer";
import { asBuffer, health, HEALTH_SERVICE_NAME } from "../../src/service/wire.ts";

/** A grpc-js Watch of `service`: the statuses received so far, and how the call ended. */
export function watch(socket: string, service: string) {
  const client = new grpc.Client(`unix:${socket}`, grpc.credentials.createInsecure());
  const statuses: number[] = [];
  const changed = new EventTarget();
  const call = client.makeServerStreamRequest(
    `/${HEALTH_SERVICE_NAME}/Watch`,
    (m: { service: string }) => asBuffer(health.request.encode(m).finish()),
    (b: Buffer) => (health.response.decode(b) as unknown as { status: number }).status,
    { service },
  );
  call.on("data", (status: number) => {
    statuses.push(status);
    changed.dispatchEvent(new Event("status"));
  });
  const ended = new Promise<grpc.StatusObject>((resolve) => call.on("status", resolve));
  call.on("error", () => {}); // The status event carries it.
  return {
    statuses,
    ended,
    cancel: () => call.cancel(),
    close: () => client.close(),
    /** Resolves once `count` statuses have arrived. */
    until(count: number): Promise<number[]> {
      return new Promise((resolve) => {
        const check = () => statuses.length >= count && resolve(statuses.slice());
        changed.addEventListener("status", check);
        check();
      });
    },
  };
}
