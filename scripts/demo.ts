/**
 * The demo chain on one machine: inventory-service ← ambassador ← order-service, each its own process,
 * logs prefixed by name, stopped together on Ctrl-C.
 *
 *   npm start                 Node: the bundles in dist/ (npm start builds them first)
 *   deno task demo            Deno: the TypeScript sources
 *
 * Ports: ORDER_PORT (3000), AMBASSADOR_PORT (8080), ADMIN_PORT (9901), INVENTORY_PORT (9000). Every other
 * variable reaches the processes, so `FAIL_EVERY=2 npm start` gives a flaky inventory and
 * `RETRY_ATTEMPTS=1 npm start` an ambassador that does not retry.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const onDeno = typeof (globalThis as { Deno?: unknown }).Deno !== 'undefined';
const here = path.dirname(fileURLToPath(import.meta.url));
// From scripts/demo.ts the project is one level up; from dist/scripts/demo.mjs, two.
const root = path.resolve(here, path.basename(path.dirname(here)) === 'dist' ? '../..' : '..');
const env = process.env;
const ports = {
  order: env.ORDER_PORT ?? '3000',
  ambassador: env.AMBASSADOR_PORT ?? '8080',
  admin: env.ADMIN_PORT ?? '9901',
  inventory: env.INVENTORY_PORT ?? '9000',
};

function argv(name: 'ambassador' | 'order-service' | 'inventory-service'): string[] {
  if (onDeno) {
    const source = name === 'ambassador' ? 'ambassador.ts' : `services/${name}.ts`;
    // Not Deno.execPath(): Deno's child_process reads a spawn of its own executable as a `node` command
    // line and rewrites it. `deno task` puts node_modules/.bin (the npm package `deno`) on the PATH.
    return ['deno', 'run', '--quiet', '--allow-net', '--allow-env', '--allow-read', path.join(root, source)];
  }
  const bundle = name === 'ambassador' ? 'dist/ambassador.mjs' : `dist/services/${name}.mjs`;
  return [process.execPath, path.join(root, bundle)];
}

const color = process.stdout.isTTY ? (code: number, s: string) => `\x1b[${code}m${s}\x1b[0m` : (_: number, s: string) => s;
const children: Array<{ name: string; child: ChildProcess }> = [];
let stopping = false;

function start(name: string, label: string, code: number, command: string[], extra: Record<string, string>): ChildProcess {
  const child = spawn(command[0], command.slice(1), { env: { ...env, ...extra }, stdio: ['ignore', 'pipe', 'pipe'] });
  const prefix = color(code, `[${label.padEnd(10)}]`);
  for (const stream of [child.stdout!, child.stderr!]) {
    let buffered = '';
    stream.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop() ?? '';
      for (const line of lines) console.log(`${prefix} ${line}`);
    });
  }
  child.on('exit', (exitCode, signal) => {
    console.log(`${prefix} exited (${signal ?? `code ${exitCode}`})`);
    if (!stopping) void stop(1);
  });
  children.push({ name, child });
  return child;
}

async function waitReady(url: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) throw new Error(`${url}: the process exited`);
    try {
      if ((await fetch(url)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${url} did not answer within 10 s`);
}

async function stop(code: number): Promise<void> {
  if (stopping) return;
  stopping = true;
  console.log('stopping: SIGTERM to every process, waiting for them to exit');
  // The app first, the ambassador after it (as a native sidecar stops), the upstream last.
  for (const name of ['order-service', 'ambassador', 'inventory-service']) {
    const entry = children.find((c) => c.name === name);
    if (!entry || entry.child.exitCode !== null || entry.child.signalCode !== null) continue;
    const exited = new Promise((r) => entry.child.once('exit', r));
    entry.child.kill('SIGTERM');
    const timer = setTimeout(() => entry.child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
  process.exit(code);
}

process.on('SIGINT', () => void stop(0));
process.on('SIGTERM', () => void stop(0));

const inventory = start('inventory-service', 'inventory', 32, argv('inventory-service'), { PORT: ports.inventory, HOST: '127.0.0.1' });
const ambassador = start('ambassador', 'ambassador', 35, argv('ambassador'), {
  UPSTREAM_URL: `http://127.0.0.1:${ports.inventory}`, PORT: ports.ambassador, ADMIN_PORT: ports.admin, ADMIN_HOST: '127.0.0.1',
  LOG_FORMAT: env.LOG_FORMAT ?? 'text',
});
const order = start('order-service', 'order', 36, argv('order-service'), { PORT: ports.order, HOST: '127.0.0.1', AMBASSADOR_URL: `http://127.0.0.1:${ports.ambassador}` });

try {
  await Promise.all([
    waitReady(`http://127.0.0.1:${ports.inventory}/healthz`, inventory),
    waitReady(`http://127.0.0.1:${ports.admin}/readyz`, ambassador),
    waitReady(`http://127.0.0.1:${ports.order}/healthz`, order),
  ]);
} catch (err) {
  console.error(`demo: ${(err as Error).message}`);
  await stop(1);
}

console.log(`
The chain is up (${onDeno ? 'Deno, from the sources' : 'Node, from the bundles'}). Try:
  curl http://localhost:${ports.order}/order                     # the whole chain
  curl http://localhost:${ports.ambassador}/inventory                 # the ambassador on its own
  curl 'http://localhost:${ports.ambassador}/inventory?fail_every=2'  # a flaky inventory: the ambassador retries
  curl http://localhost:${ports.admin}/readyz                    # the ambassador's admin port
Ctrl-C stops all three.
`);
