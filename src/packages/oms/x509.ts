// @peculiar/x509 resolves its algorithm providers through tsyringe, which needs the Reflect metadata API
// before the library's first line runs. Every OMS module imports x509 through this file so the polyfill is
// always evaluated first, whatever the importing program loads before.
import "reflect-metadata";
export * from "@peculiar/x509";
