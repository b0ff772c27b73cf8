/**
 * Serving a demo service on Node (through @hono/node-server, loaded only there) or on Deno, and stopping
 * it on SIGTERM/SIGINT. Shared by the demo services; the ambassador has its own, fuller drain.
 */
import type { Hono } from 'hono';

interface DenoLike {
  serve(
    options: {
      hostname: string;
      port: number;
      onListen?: (addr: { port: number }) => void;
      handler: (req: Request) => Response | Promise<Response>;
    },
  ): { shutdown(): Promise<void> };
  addSignalListener(signal: string, handler: () => void): void;
  env: { toObject(): Record<string, string> };
  exit(code: number): never;
}

export const deno = (globalThis as { Deno?: DenoLike }).Deno;

export function environment(): Record<string, string | undefined> {
  return deno ? deno.env.toObject() : process.env;
}

export function log(service: string, msg: string, fields: Record<string, unknown> = {}): void {
  console.log(JSON.stringify({ time: new Date().toISOString(), service, msg, ...fields }));
}

/** Reads a whole-number variable or stops with exit code 2 naming it, its value and what was expected. */
export function intVar(
  env: Record<string, string | undefined>,
  name: string,
  fallback: number,
  min = 0,
  max = Number.MAX_SAFE_INTEGER,
): number {
  const v = env[name]?.trim();
  if (!v) return fallback;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max) {
    fail(`${name}=${JSON.stringify(v)}: expected a whole number from ${min} to ${max}`);
  }
  return Number(v);
}

export function fail(message: string): never {
  console.error(`invalid configuration: ${message}`);
  return exit(2);
}

function exit(code: number): never {
  return deno ? deno.exit(code) : process.exit(code);
}

/** TLS for a service that wants it: node:https options (certificate, key, and a client CA for mTLS). */
export interface TlsOptions {
  cert: string;
  key: string;
  ca?: string;
  requestCert?: boolean;
  rejectUnauthorized?: boolean;
}

/** Listens, logs the port, and closes the listener (then exits 0) on SIGTERM or SIGINT. With `tls`, it
 * serves HTTPS through node:https on either runtime (Deno.serve cannot ask for client certificates). */
export async function serve(
  service: string,
  app: Hono<any>,
  host: string,
  port: number,
  tls?: TlsOptions,
): Promise<void> {
  if (deno && !tls) {
    let server: { shutdown(): Promise<void> } | undefined;
    // Signal listeners first: a SIGTERM right after the `listening` line must not find Deno's default.
    for (const signal of ['SIGTERM', 'SIGINT']) {
      deno.addSignalListener(signal, () => {
        log(service, `${signal}: stopping`);
        void (server?.shutdown() ?? Promise.resolve()).then(() => deno.exit(0));
      });
    }
    server = deno.serve({
      hostname: host,
      port,
      onListen: (addr) => log(service, 'listening', { port: addr.port }),
      handler: app.fetch,
    });
    return;
  }
  const { serve: nodeServe } = await import('@hono/node-server');
  const https = tls ? { createServer: (await import('node:https')).createServer, serverOptions: tls } : {};
  const server = nodeServe(
    { fetch: app.fetch, hostname: host, port, ...https } as Parameters<typeof nodeServe>[0],
    (info) => log(service, 'listening', { port: info.port }),
  );
  const stop = (signal: string) => {
    log(service, `${signal}: stopping`);
    server.close(() => exit(0));
    (server as import('node:http').Server).closeIdleConnections?.();
    setTimeout(() => exit(0), 5000).unref?.();
  };
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    if (deno) deno.addSignalListener(signal, () => stop(signal));
    else process.on(signal, () => stop(signal));
  }
}
