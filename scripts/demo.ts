/**
 * The demo chain on one machine, each its own process, logs prefixed by name, stopped together on Ctrl-C:
 *
 *   order-service → ambassador ─┬─ /inventory → inventory-service   (plain HTTP)
 *                               └─ /payments  → payments-service    (mutual TLS)
 *
 *   npm start                 Node: the bundles in dist/ (npm start builds them first)
 *   deno task demo            Deno: the TypeScript sources
 *   npm run build && npx bun scripts/demo.ts   Bun: ambassador.ts (the demo services stay on Node)
 *
 * The ambassador is configured by a routes file written here, next to the certificates the mTLS leg
 * needs (a CA, the payments server's certificate, the order service's client certificate), made with
 * `openssl` in a temporary folder that is removed on exit. Without `openssl` the demo runs the inventory
 * leg alone and says so.
 *
 * Ports: ORDER_PORT (3000), AMBASSADOR_PORT (8080), ADMIN_PORT (9901), INVENTORY_PORT (9000),
 * PAYMENTS_PORT (9443). Every other variable reaches the processes, so `FAIL_EVERY=2 npm start` gives a
 * flaky inventory and `RETRY_ATTEMPTS=1 npm start` an ambassador that does not retry.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { issue, makeCa } from './certificates.ts';
import { shippedNode } from './node.ts';

const onDeno = typeof (globalThis as { Deno?: unknown }).Deno !== 'undefined';
const onBun = typeof (globalThis as { Bun?: unknown }).Bun !== 'undefined';
const here = path.dirname(fileURLToPath(import.meta.url));
// From scripts/demo.ts the project is one level up; from dist/scripts/demo.mjs, two.
const root = path.resolve(here, path.basename(path.dirname(here)) === 'dist' ? '../..' : '..');
const env = process.env;
const ports = {
  order: env.ORDER_PORT ?? '3000',
  ambassador: env.AMBASSADOR_PORT ?? '8080',
  admin: env.ADMIN_PORT ?? '9901',
  inventory: env.INVENTORY_PORT ?? '9000',
  payments: env.PAYMENTS_PORT ?? '9443',
};

function argv(name: 'ambassador' | 'order-service' | 'inventory-service' | 'payments-service'): string[] {
  if (onDeno) {
    const source = name === 'ambassador' ? 'ambassador.ts' : `services/${name}.ts`;
    // Not Deno.execPath(): Deno's child_process reads a spawn of its own executable as a `node` command
    // line and rewrites it. `deno task` puts node_modules/.bin (the npm package `deno`) on the PATH.
    return ['deno', 'run', '--quiet', '--allow-net', '--allow-env', '--allow-read', path.join(root, source)];
  }
  // Bun runs the ambassador from its source, with the executable running this script. The demo services
  // stay on Node (the bundles): under Bun's node:https the payments service would not hold its clients
  // to a certificate.
  if (onBun && name === 'ambassador') return [process.execPath, path.join(root, 'ambassador.ts')];
  const bundle = name === 'ambassador' ? 'dist/ambassador.mjs' : `dist/services/${name}.mjs`;
  return [shippedNode(root), path.join(root, bundle)];
}

const color = process.stdout.isTTY
  ? (code: number, s: string) => `\x1b[${code}m${s}\x1b[0m`
  : (_: number, s: string) => s;
const children: Array<{ name: string; child: ChildProcess }> = [];
let stopping = false;

function start(
  name: string,
  label: string,
  code: number,
  command: string[],
  extra: Record<string, string>,
): ChildProcess {
  // A process group of its own: a terminal's Ctrl-C (and `deno task`'s SIGTERM after it) reaches this runner
  // alone, which then stops the processes one by one, in the order `stop` gives; each gets one SIGTERM.
  const child = spawn(command[0], command.slice(1), {
    env: { ...env, ...extra },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
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

async function waitListening(port: number, child: ChildProcess): Promise<void> {
  const net = await import('node:net');
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) throw new Error(`port ${port}: the process exited`);
    const open = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.on('connect', () => (s.destroy(), resolve(true)));
      s.on('error', () => resolve(false));
    });
    if (open) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port ${port} did not open within 10 s`);
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
  // The app first, the ambassador after it (as a native sidecar stops), the upstreams last.
  for (const name of ['order-service', 'ambassador', 'inventory-service', 'payments-service']) {
    const entry = children.find((c) => c.name === name);
    if (!entry || entry.child.exitCode !== null || entry.child.signalCode !== null) continue;
    const exited = new Promise((r) => entry.child.once('exit', r));
    entry.child.kill('SIGTERM');
    const timer = setTimeout(() => entry.child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
  rmSync(dir, { recursive: true, force: true });
  process.exit(code);
}

/** The certificates of the mTLS leg; false when `openssl` is not there to make them. */
function makeCertificates(dir: string): boolean {
  try {
    makeCa(dir, 'demo-ca');
    issue(dir, 'payments', 'demo-ca', 'payments-service', 'DNS:payments-service,DNS:localhost,IP:127.0.0.1');
    issue(dir, 'order-service', 'demo-ca', 'order-service');
    return true;
  } catch (err) {
    console.log(
      `demo: no certificates (${(err as Error).message.split('\n')[0]}): the payments leg over mTLS is left out`,
    );
    return false;
  }
}

process.on('SIGINT', () => void stop(0));
process.on('SIGTERM', () => void stop(0));
// Should the runner end any other way, none of its processes outlives it.
process.on('exit', () => {
  for (const { child } of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
});

const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-demo-'));
const mtls = makeCertificates(dir);
const file = (name: string) => path.join(dir, name);
const routes = [
  { name: 'inventory', prefix: '/inventory', upstream: `http://127.0.0.1:${ports.inventory}` },
  ...(mtls
    ? [{
      // A payment is not repeated: one attempt, whatever the inventory route does.
      name: 'payments',
      prefix: '/payments',
      upstream: `https://127.0.0.1:${ports.payments}`,
      retryAttempts: 1,
      tls: { caFile: file('demo-ca.pem'), certFile: file('order-service.pem'), keyFile: file('order-service.key') },
    }]
    : []),
];
writeFileSync(file('routes.json'), JSON.stringify({ routes }, null, 2));

const inventory = start('inventory-service', 'inventory', 32, argv('inventory-service'), {
  PORT: ports.inventory,
  HOST: '127.0.0.1',
});
const payments = mtls
  ? start('payments-service', 'payments', 33, argv('payments-service'), {
    PORT: ports.payments,
    HOST: '127.0.0.1',
    TLS_CERT_FILE: file('payments.pem'),
    TLS_KEY_FILE: file('payments.key'),
    CLIENT_CA_FILE: file('demo-ca.pem'),
  })
  : undefined;
const ambassador = start('ambassador', 'ambassador', 35, argv('ambassador'), {
  ROUTES_FILE: file('routes.json'),
  PORT: ports.ambassador,
  ADMIN_PORT: ports.admin,
  ADMIN_HOST: '127.0.0.1',
  LOG_FORMAT: env.LOG_FORMAT ?? 'text',
});
const order = start('order-service', 'order', 36, argv('order-service'), {
  PORT: ports.order,
  HOST: '127.0.0.1',
  AMBASSADOR_URL: `http://127.0.0.1:${ports.ambassador}`,
  PAYMENTS_PATH: mtls ? '/payments' : '',
});

try {
  await Promise.all([
    waitReady(`http://127.0.0.1:${ports.inventory}/healthz`, inventory),
    waitReady(`http://127.0.0.1:${ports.admin}/readyz`, ambassador),
    waitReady(`http://127.0.0.1:${ports.order}/healthz`, order),
    // The payments service asks for a client certificate: a TCP connection is as far as the runner gets.
    ...(payments ? [waitListening(Number(ports.payments), payments)] : []),
  ]);
} catch (err) {
  console.error(`demo: ${(err as Error).message}`);
  await stop(1);
}

const a = `http://localhost:${ports.ambassador}`;
console.log(`
The chain is up (${
  onDeno ? 'Deno, from the sources' : onBun ? 'Bun, the ambassador from its source' : 'Node, from the bundles'
}): one ambassador in front of
the inventory (plain HTTP)${mtls ? ' and the payments service (mutual TLS, certificates in ' + dir + ')' : ''}. Try:
  curl http://localhost:${ports.order}/order                     # the whole chain
  curl ${a}/inventory                 # the ambassador on its own
  curl '${a}/inventory?fail_every=2'  # a flaky inventory: the ambassador retries${
  mtls
    ? `
  curl -X POST ${a}/payments          # over mTLS: the ambassador holds the client certificate`
    : ''
}
  curl ${a}/shipping                  # no route: 404 from the ambassador
Watch the circuit breaker open and close:
  for i in 1 2; do curl '${a}/inventory?fail_percent=100'; done   # 5 failed attempts in a row: ejected
  curl -i ${a}/inventory              # 503 at once, with Retry-After
  curl -s http://localhost:${ports.admin}/metrics | grep endpoint_state
  sleep 5; curl ${a}/inventory        # a probe gets through: closed again
Ctrl-C stops them all.
`);
